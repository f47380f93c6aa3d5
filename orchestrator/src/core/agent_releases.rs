//! Agent releases, pure: what an uploaded agent binary is (its
//! architecture, read from the ELF header) and which chunk of it a fetch
//! may have. The files and the table are `engine::agent_releases`.
//!
//! The ELF header is read by hand: the 20 bytes that say "ELF", the class,
//! the byte order, the type and the machine are fixed by the System V ABI
//! (`e_ident[0..16]`, `e_type` at 16, `e_machine` at 18); a crate that
//! parses whole object files would be far more code than this check.

use drover_shared::update::MAX_CHUNK_BYTES;

/// The largest agent binary the orchestrator takes.
pub const MAX_BINARY_BYTES: usize = 64 * 1024 * 1024;

/// Why an upload is not an agent binary, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAnAgent(pub String);

/// The architecture (Rust's name, as the agent's `hello` reports it) of a
/// Linux ELF executable, or why it is not one Drover can run.
pub fn elf_arch(bytes: &[u8]) -> Result<&'static str, NotAnAgent> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return Err(NotAnAgent(
            "the body is not an ELF executable (no \\x7fELF header)".into(),
        ));
    }
    let class64 = match bytes[4] {
        1 => false,
        2 => true,
        c => return Err(NotAnAgent(format!("unknown ELF class {c}"))),
    };
    let little = match bytes[5] {
        1 => true,
        2 => false,
        d => return Err(NotAnAgent(format!("unknown ELF byte order {d}"))),
    };
    let half = |at: usize| {
        let b = [bytes[at], bytes[at + 1]];
        if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    // ET_EXEC (static, non-PIE) or ET_DYN (PIE, what Rust builds).
    let e_type = half(16);
    if e_type != 2 && e_type != 3 {
        return Err(NotAnAgent(format!(
            "the ELF file is not an executable (e_type {e_type})"
        )));
    }
    let arch = match (half(18), class64, little) {
        (62, true, true) => "x86_64",
        (183, true, true) => "aarch64",
        (40, false, true) => "arm",
        (m, _, _) => {
            return Err(NotAnAgent(format!(
                "the ELF machine {m} ({}-bit, {}) is not one Drover's agent is built for (x86_64, aarch64, arm)",
                if class64 { 64 } else { 32 },
                if little { "little-endian" } else { "big-endian" }
            )))
        }
    };
    Ok(arch)
}

/// The byte range a fetch of `len` bytes at `offset` gets from a binary of
/// `size` bytes: at most [`MAX_CHUNK_BYTES`], at least one byte; an offset
/// at or past the end (or a zero length) is an error.
pub fn chunk(size: u64, offset: u64, len: u64) -> Result<std::ops::Range<u64>, String> {
    if offset >= size {
        return Err(format!(
            "offset {offset} is at or past the end of the binary ({size} bytes)"
        ));
    }
    if len == 0 {
        return Err("len must be at least 1".into());
    }
    let end = offset.saturating_add(len.min(MAX_CHUNK_BYTES)).min(size);
    Ok(offset..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, data: u8, e_type: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = data;
        let (t, m) = if data == 1 {
            (e_type.to_le_bytes(), machine.to_le_bytes())
        } else {
            (e_type.to_be_bytes(), machine.to_be_bytes())
        };
        h[16..18].copy_from_slice(&t);
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn architectures_from_the_elf_header() {
        assert_eq!(elf_arch(&header(2, 1, 3, 62)), Ok("x86_64"));
        assert_eq!(elf_arch(&header(2, 1, 2, 183)), Ok("aarch64"));
        assert_eq!(elf_arch(&header(1, 1, 3, 40)), Ok("arm"));
        for bad in [
            header(2, 1, 1, 62),  // relocatable object
            header(2, 1, 4, 62),  // core dump
            header(2, 2, 2, 62),  // big-endian x86_64: no such thing
            header(1, 1, 2, 3),   // i386
            header(2, 1, 2, 243), // riscv64
            header(3, 1, 2, 62),
            b"#!/bin/sh\nexit 0\n".to_vec(),
            b"\x7fELF".to_vec(),
            Vec::new(),
        ] {
            assert!(elf_arch(&bad).is_err(), "{bad:?}");
        }
        // The test's own binary is an executable of this machine.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert_eq!(elf_arch(&me), Ok(std::env::consts::ARCH));
    }

    #[test]
    fn chunks_stay_inside_the_binary_and_the_message() {
        assert_eq!(chunk(10, 0, 4), Ok(0..4));
        assert_eq!(chunk(10, 8, 4), Ok(8..10));
        assert_eq!(chunk(10, 9, u64::MAX), Ok(9..10));
        assert_eq!(chunk(u64::MAX, 0, u64::MAX), Ok(0..MAX_CHUNK_BYTES));
        assert!(chunk(10, 10, 1).is_err());
        assert!(chunk(10, u64::MAX, 1).is_err());
        assert!(chunk(0, 0, 1).is_err());
        assert!(chunk(10, 0, 0).is_err());
    }
}
