//! The `mirroring` section at start and on reload (SIGHUP or the admin API). The mirror is
//! started the first time a config has the section and then lives as long as the daemon:
//! the engines' tables keep the watcher it installed, so a reload that changes the Redis
//! URL or the instance name reconnects the same mirror, and one that removes the section
//! idles it. Local tables are never touched by any of this; the data path writes its
//! binding events only while the section is present (`Globals::emit_bindings`, written by
//! `program()`).

use std::sync::Arc;

use crate::{
    config::Config,
    engine::Engine,
    mirror::{Mirror, xdp::XdpMirror},
    state::SharedSnapshot,
};

#[derive(Default)]
pub(super) struct MirrorSlot(Option<(Mirror, Arc<XdpMirror>)>);

impl MirrorSlot {
    /// Start, reconnect or stop mirroring as `cfg` says, and watch `engines`' tables.
    pub(super) fn apply<'a>(
        &mut self,
        cfg: &Config,
        shared: &SharedSnapshot,
        engines: impl Iterator<Item = &'a Arc<Engine>>,
    ) {
        match (&self.0, &cfg.mirroring) {
            (None, None) => {}
            (None, Some(m)) => {
                let xdp = XdpMirror::new(cfg.pin_dir.clone(), shared.clone());
                let mirror = Mirror::start(m, Some(xdp.clone()));
                xdp.start_reader(mirror.sender(), mirror.stats.clone());
                mirror.set_engines(engines);
                self.0 = Some((mirror, xdp));
            }
            (Some((mirror, _)), m) => {
                mirror.reconfigure(m.as_ref());
                mirror.set_engines(engines);
            }
        }
    }

    /// Watch the tables of engines a reload added or replaced.
    pub(super) fn set_engines<'a>(&self, engines: impl Iterator<Item = &'a Arc<Engine>>) {
        if let Some((m, _)) = &self.0 {
            m.set_engines(engines);
        }
    }

    pub(super) fn mirror(&self) -> Option<&Mirror> {
        self.0.as_ref().map(|(m, _)| m)
    }
}
