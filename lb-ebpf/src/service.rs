//! Finding a packet's virtual service. IPv6: `TETHER_SERVICES` (20-byte key). IPv4: this
//! CPU's copy in `TETHER_SVCCACHE` when it belongs to the current `TETHER_SVC_GEN`, else
//! `TETHER_SVC4` (8-byte key), whose entry is then copied into the cache. The daemon raises
//! the generation after every change to the service maps, so a copy never outlives the
//! entry it was taken from: a removed or changed service is seen by the next packet that
//! reads the new generation, as with a map lookup.

use lb_common::{SVC_CACHE_SLOTS, Service, ServiceKey, ServiceKey4};

use crate::{
    maps::{TETHER_SERVICES, TETHER_SVC_GEN, TETHER_SVC4, TETHER_SVCCACHE},
    parse::{Aligned, Flow, store_addr},
};

/// The service of the flow's VIP, port and protocol.
///
/// The reference is valid for this program run: a map entry is not freed while it runs
/// (`TETHER_SERVICES` and `TETHER_SVC4` are not preallocated, so an update replaces the
/// element), and a cache slot is only written by this CPU, which runs one packet at a time
/// (XDP and BPF_PROG_TEST_RUN run with bottom halves off, as `stats` relies on too).
#[inline(always)]
pub fn find(flow: &Flow) -> Option<&'static Service> {
    if !flow.is_v6 {
        return find_v4(flow);
    }
    let mut key = Aligned(ServiceKey {
        addr_be: [0; 16],
        port_be: flow.dport_be,
        proto: flow.proto,
        _pad: 0,
    });
    store_addr(&mut key.0.addr_be, &flow.dst);
    // By reference: a copy would lose the alignment that makes the stores above cheap.
    let key = &key.0;
    // SAFETY: see above.
    unsafe { TETHER_SERVICES.get(key) }
}

#[inline(always)]
fn find_v4(flow: &Flow) -> Option<&'static Service> {
    // bpfel: the low word's bytes come first, as in `ServiceKey4`'s field order.
    const _: () = assert!(cfg!(target_endian = "little"));
    const _: () = assert!(core::mem::offset_of!(ServiceKey4, port_be) == 4);
    const _: () = assert!(core::mem::offset_of!(ServiceKey4, proto) == 6);
    let word = flow.dst[3] as u64 | (flow.dport_be as u64) << 32 | (flow.proto as u64) << 48;
    // SAFETY: ServiceKey4 is repr(C), 8 bytes, every bit pattern valid; `_pad` is 0.
    let key = unsafe { core::mem::transmute::<u64, ServiceKey4>(word) };
    // Read before the map, so a copy is never tagged with a generation newer than the entry
    // it copies (the daemon writes the map, then raises the generation; x86 keeps two loads
    // in program order).
    let generation = TETHER_SVC_GEN.get(0).copied().unwrap_or(0);
    // Fibonacci hashing: the top bits of the product spread nearby VIPs and ports.
    let slot = (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as u32 & (SVC_CACHE_SLOTS - 1);
    let Some(c) = TETHER_SVCCACHE.get_ptr_mut(slot) else {
        // SAFETY: see `find`.
        return unsafe { TETHER_SVC4.get(key) };
    };
    // SAFETY: this CPU's slot, written only by this CPU (see `find`); the key is compared as
    // the one word it is.
    unsafe {
        let cached_key = core::mem::transmute::<ServiceKey4, u64>((*c).key);
        if generation != 0 && (*c).generation == generation && cached_key == word {
            return Some(&(*c).service);
        }
    }
    // SAFETY: see `find`.
    let svc = unsafe { TETHER_SVC4.get(key) }?;
    if generation == 0 {
        return Some(svc);
    }
    // SAFETY: as above. The slot is marked empty while it is rewritten.
    unsafe {
        core::ptr::write_volatile(&raw mut (*c).generation, 0);
        copy_service(svc, &raw mut (*c).service);
        (*c).key = key;
        core::ptr::write_volatile(&raw mut (*c).generation, generation);
        Some(&(*c).service)
    }
}

/// `*dst = *src` as six 64-bit moves: a plain assignment becomes a call to a byte-by-byte
/// `memmove` on this target.
#[inline(always)]
unsafe fn copy_service(src: &Service, dst: *mut Service) {
    const WORDS: usize = core::mem::size_of::<Service>() / 8;
    const _: () = assert!(core::mem::size_of::<Service>() == WORDS * 8);
    const _: () = assert!(core::mem::align_of::<Service>() == 8);
    let s = (src as *const Service).cast::<u64>();
    let d = dst.cast::<u64>();
    let mut i = 0;
    while i < WORDS {
        // SAFETY: both are 8-aligned `Service`s of WORDS words; volatile keeps LLVM from
        // turning the loop back into a memmove call.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}
