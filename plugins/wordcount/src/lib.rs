//! Counts files, lines, words and bytes under a directory.
//!
//! Input: `{"path": DIR}`. Output: `{"files": N, "lines": N, "words": N, "bytes": N}`.
//! The directory must be inside one of the directories the policy preopens;
//! anything else fails with the WASI error, because the task cannot see it.

use std::fs;
use std::path::Path;

wit_bindgen::generate!({
    path: "../../wit",
    world: "apex:task/task",
    generate_all,
});

#[derive(serde::Deserialize)]
struct Input {
    path: String,
}

#[derive(Default, serde::Serialize)]
struct Counts {
    files: u64,
    lines: u64,
    words: u64,
    bytes: u64,
}

fn count_dir(dir: &Path, counts: &mut Counts) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let path = entry.path();
        let file_type = entry
            .file_type()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;

        if file_type.is_dir() {
            count_dir(&path, counts)?;
        } else if file_type.is_file() {
            let data = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let text = String::from_utf8_lossy(&data);
            counts.files += 1;
            counts.bytes += data.len() as u64;
            counts.lines += text.lines().count() as u64;
            counts.words += text.split_whitespace().count() as u64;
        }
    }
    Ok(())
}

struct Wordcount;

impl Guest for Wordcount {
    fn run(input: String) -> Result<String, String> {
        let input: Input = serde_json::from_str(&input)
            .map_err(|e| format!("invalid input: {e}; expected {{\"path\": DIR}}"))?;

        let mut counts = Counts::default();
        count_dir(Path::new(&input.path), &mut counts)?;
        serde_json::to_string(&counts).map_err(|e| e.to_string())
    }
}

export!(Wordcount);
