//! A named network namespace (`ip netns add`): entering it on a thread of its own, starting a
//! process inside it, and making sockets that live in it. A socket belongs to the namespace it
//! was created in, whatever thread uses it later, so the bench can probe a node inside its
//! namespace from its ordinary tokio tasks.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub struct Netns {
    name: String,
    /// `/run/netns/<name>`, held open so `setns` works without a path lookup (also in a forked
    /// child before exec).
    handle: File,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Runs a command to completion; an error with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command to completion and returns its stdout.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Netns {
    /// `ip netns add <name>`. The caller removes it ([`Netns::delete`]); [`super::Lab`] does.
    pub fn create(name: &str) -> Result<Netns> {
        run("ip", &["netns", "add", name])?;
        Netns::open(name)
    }

    /// A namespace `ip netns` already knows.
    pub fn open(name: &str) -> Result<Netns> {
        let path = format!("/run/netns/{name}");
        let handle = File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(Netns {
            name: name.to_string(),
            handle,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Kills the processes still inside (`ip netns pids`: the bench's own children, left behind
    /// when a run was killed) and removes the namespace, which destroys its interfaces.
    pub fn delete(name: &str) -> Result<()> {
        if let Ok(pids) = output("ip", &["netns", "pids", name]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) with a pid read just now and a constant signal.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        run("ip", &["netns", "del", name])
    }

    /// Moves the calling thread into this namespace, for good: only for threads the bench
    /// spawned for the purpose.
    fn enter(&self) -> io::Result<()> {
        // SAFETY: setns(2) on an open namespace file; it changes only the calling thread.
        if unsafe { libc::setns(self.handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside the namespace and returns what it returns.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let handle = self.handle.try_clone()?;
        std::thread::spawn(move || {
            // SAFETY: as in `enter`.
            if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// Spawns a long-lived thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<io::Result<T>>> {
        let ns = Netns {
            name: self.name.clone(),
            handle: self.handle.try_clone()?,
        };
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                ns.enter()?;
                Ok(f())
            })
    }

    /// Makes `command` start inside the namespace (setns between fork and exec).
    pub fn place(&self, command: &mut Command) {
        let fd = self.handle.as_raw_fd();
        // SAFETY: the closure calls only setns(2), which is async-signal-safe, on a descriptor
        // the child inherited from this open file.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// A non-blocking TCP socket (not yet connected) that lives in the namespace.
    pub fn tcp_socket(&self) -> io::Result<tokio::net::TcpSocket> {
        let fd = self.within(|| {
            // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })?;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }

    /// The interface counter `/sys/class/net/<dev>/statistics/<name>` as seen inside the
    /// namespace: sysfs shows the namespace of whoever mounted it, so this reads it through
    /// `ip netns exec`, which mounts a fresh one for the command.
    pub fn interface_counter(&self, dev: &str, name: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{dev}/statistics/{name}");
        let text = output("ip", &["netns", "exec", &self.name, "cat", &path])?;
        text.trim()
            .parse()
            .with_context(|| format!("{path} in {}: {text:?}", self.name))
    }
}
