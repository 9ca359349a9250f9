//! Cheap structural checks on a `.cwasm` before it is stored or mapped.
//!
//! wasmtime artifacts are ELF files. Reading the header lets us refuse random bytes, a
//! truncated download, or the other architecture's artifact with a message that says which,
//! instead of handing them to the loader.

use edged_compiler::Target;

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const ELF64_HEADER_LEN: usize = 64;

fn machine_name(machine: u16) -> String {
    match machine {
        EM_X86_64 => "x86_64".into(),
        EM_AARCH64 => "aarch64".into(),
        other => format!("ELF machine {other}"),
    }
}

fn target_machine(target: Target) -> u16 {
    match target {
        Target::X86_64Linux => EM_X86_64,
        Target::Aarch64Linux => EM_AARCH64,
    }
}

/// Checks `bytes` look like a complete 64-bit little-endian ELF artifact for `target`.
pub fn check_artifact(bytes: &[u8], target: Target) -> Result<(), String> {
    if bytes.len() < ELF64_HEADER_LEN || &bytes[..4] != b"\x7fELF" {
        return Err("not a compiled artifact (no ELF header)".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF artifact".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let machine = u16_at(18);
    if machine != target_machine(target) {
        return Err(format!(
            "compiled for {}, not for {target}",
            machine_name(machine)
        ));
    }
    // Section headers sit at the end of wasmtime's ELF output, so a file cut short loses them.
    let shoff = u64_at(40);
    let shentsize = u64::from(u16_at(58));
    let shnum = u64::from(u16_at(60));
    let end = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if end > bytes.len() as u64 {
        return Err(format!(
            "truncated: section headers end at byte {end} but the artifact has {} bytes",
            bytes.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(machine: u16, shoff: u64, shnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h[40..48].copy_from_slice(&shoff.to_le_bytes());
        h[58..60].copy_from_slice(&64u16.to_le_bytes());
        h[60..62].copy_from_slice(&shnum.to_le_bytes());
        h
    }

    #[test]
    fn refuses_random_bytes() {
        let err = check_artifact(&[0xAB; 200], Target::X86_64Linux).unwrap_err();
        assert!(err.contains("no ELF header"), "{err}");
    }

    #[test]
    fn refuses_other_arch() {
        let err = check_artifact(&header(EM_AARCH64, 0, 0), Target::X86_64Linux).unwrap_err();
        assert_eq!(
            err,
            "compiled for aarch64, not for x86_64-unknown-linux-gnu"
        );
    }

    #[test]
    fn refuses_truncated() {
        let err = check_artifact(&header(EM_X86_64, 64, 4), Target::X86_64Linux).unwrap_err();
        assert!(err.starts_with("truncated"), "{err}");
        let mut whole = header(EM_X86_64, 64, 4);
        whole.resize(64 + 4 * 64, 0);
        check_artifact(&whole, Target::X86_64Linux).unwrap();
    }
}
