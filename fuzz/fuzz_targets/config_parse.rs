//! Config loading with any text: a config (which then compiles) or errors
//! that each point inside the text, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::config::{self, AccessTarget};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match config::parse("fuzz.toml", text, None) {
        Ok(cfg) => {
            // A file access log would be created in the working directory.
            if !matches!(cfg.log.access, AccessTarget::File(_)) {
                let _ = tether::snapshot::compile(&cfg, &Default::default(), 1);
            }
        }
        Err(errs) => {
            assert!(!errs.0.is_empty());
            let lines: Vec<&str> = text.split('\n').collect();
            for e in &errs.0 {
                assert!(e.line >= 1 && e.line <= lines.len(), "{e}");
                assert!(e.col >= 1 && e.col <= lines[e.line - 1].chars().count() + 1, "{e}");
            }
        }
    }
});
