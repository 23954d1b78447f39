//! TLS peers for the end-to-end tests: `openssl s_server` backends in the backend
//! namespaces (each with a certificate whose subject is its backend name) and `openssl
//! s_client` runs in the client namespace, whose output says which backend answered and
//! whether the session was resumed.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::{Topology, run_cmd, wait_until};

/// `der` as a PEM block with `label` (CERTIFICATE, PRIVATE KEY), 64 columns a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A self-signed EC certificate with subject `CN=<cn>` in `dir`: (cert, key).
pub fn self_signed(dir: &Path, cn: &str) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert = dir.join(format!("{cn}.crt"));
    let key = dir.join(format!("{cn}.key"));
    run_cmd(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={cn}"),
        "-keyout",
        key.to_str().context("key path")?,
        "-out",
        cert.to_str().context("cert path")?,
    ]))
    .context("openssl req (is openssl installed?)")?;
    Ok((cert, key))
}

/// `openssl s_server -www` in each backend namespace on `port`, killed on drop.
pub struct TlsBackends {
    children: Vec<Child>,
    pub dir: PathBuf,
}

impl TlsBackends {
    /// One server per backend of `topo`, its certificate's subject the backend's name
    /// (`b1`, ...). `extra` is added to every s_server command line (e.g. `-no_ticket`).
    pub fn start(topo: &Topology, port: u16, extra: &[&str]) -> Result<TlsBackends> {
        let dir = std::env::temp_dir().join(format!("{}-tls", topo.ns_prefix));
        let mut me = TlsBackends {
            children: Vec::new(),
            dir,
        };
        for (i, node) in topo.backends.iter().enumerate() {
            let name = topo.backend_name(i);
            let (cert, key) = self_signed(&me.dir, &name)?;
            let child = Command::new("ip")
                .args(["netns", "exec", &node.ns, "openssl", "s_server", "-quiet"])
                .args(["-accept", &port.to_string(), "-www"])
                .arg("-cert")
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning openssl s_server")?;
            me.children.push(child);
            let ns = node.ns.clone();
            let listening = wait_until(Duration::from_secs(5), || {
                run_cmd(
                    Command::new("ip")
                        .args(["netns", "exec", &ns, "ss", "-Htln"])
                        .arg(format!("sport = :{port}")),
                )
                .is_ok_and(|o| !o.trim().is_empty())
            });
            if !listening {
                bail!("s_server of {name} is not listening on {port} in {ns}");
            }
        }
        Ok(me)
    }
}

impl Drop for TlsBackends {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one `openssl s_client` handshake showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The server certificate's CN (the backend's name).
    pub subject: String,
    /// "Reused" (a resumed session) rather than "New".
    pub reused: bool,
    /// e.g. "TLSv1.2".
    pub protocol: String,
}

/// Runs `openssl s_client` in namespace `ns` against `addr` with `args` (e.g. `-tls1_2`,
/// `-sess_out F`), sending nothing, and reads its report. Bounded by `timeout` (the
/// `timeout` utility).
pub fn s_client(ns: &str, addr: &str, args: &[&str], timeout: Duration) -> Result<Handshake> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "timeout"])
        .arg(format!("{}", timeout.as_secs().max(1)))
        .args(["openssl", "s_client", "-connect", addr])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("spawning openssl s_client")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_s_client(&text).with_context(|| {
        format!(
            "s_client {args:?} to {addr} ({}): stdout:\n{text}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Like [`s_client`], writing `input` after the handshake and keeping the connection until
/// the server closes it (`-ign_eof`); returns the report and everything s_client printed.
pub fn s_client_send(
    ns: &str,
    addr: &str,
    args: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Result<(Handshake, String)> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "timeout"])
        .arg(format!("{}", timeout.as_secs().max(1)))
        .args(["openssl", "s_client", "-ign_eof", "-connect", addr])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning openssl s_client")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(input).context("writing to s_client")?;
    }
    let out = child.wait_with_output().context("waiting for s_client")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let h = parse_s_client(&text).with_context(|| {
        format!(
            "s_client {args:?} to {addr} ({}): stdout:\n{text}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((h, text))
}

/// The subject CN, "New"/"Reused" and protocol of s_client's report.
pub fn parse_s_client(text: &str) -> Result<Handshake> {
    let subject = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("subject=")?;
            let cn = rest.split("CN").nth(1)?;
            Some(cn.trim_start_matches([' ', '=']).trim().to_string())
        })
        .context("no subject= line")?;
    let (reused, protocol) = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            let (kind, rest) = l.split_once(", ")?;
            let reused = match kind {
                "New" => false,
                "Reused" => true,
                _ => return None,
            };
            Some((reused, rest.split(',').next()?.trim().to_string()))
        })
        .context("no New/Reused line")?;
    Ok(Handshake {
        subject,
        reused,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s_client_reports() {
        let text = "CONNECTED(00000003)\n---\nServer certificate\n-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\nsubject=CN = b2\nissuer=CN = b2\n---\nReused, TLSv1.2, Cipher is ECDHE-ECDSA-AES256-GCM-SHA384\n";
        assert_eq!(
            parse_s_client(text).unwrap(),
            Handshake {
                subject: "b2".into(),
                reused: true,
                protocol: "TLSv1.2".into()
            }
        );
        let text = "subject=CN=b1\nNew, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384\n";
        let h = parse_s_client(text).unwrap();
        assert_eq!((h.subject.as_str(), h.reused), ("b1", false));
        assert!(parse_s_client("CONNECTED\n").is_err());
    }
}
