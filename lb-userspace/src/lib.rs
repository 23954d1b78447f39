//! tether daemon library.
