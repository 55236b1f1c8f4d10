//! Deciding whether a shell call may run: splitting the command, matching
//! `shell_allow`, and checking the program, working directory and arguments.
//!
//! Nothing here starts a process; [`super::exec`] does, after a [`Plan`] has
//! been approved.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::policy::AllowedPath;

/// Characters that a shell would interpret when unquoted.
const SHELL_SYNTAX: &[char] = &[
    ';', '|', '&', '>', '<', '`', '$', '\n', '\r', '*', '?', '[', ']', '{', '}', '(', ')',
];

/// Git options that run programs, load configuration or change where git
/// works. Denied unless a `shell_allow` entry names them.
const GIT_DENIED_LONG: &[&str] = &[
    "--upload-pack",
    "--receive-pack",
    "--exec",
    "--exec-path",
    "--config",
    "--config-env",
    "--template",
    "--git-dir",
    "--work-tree",
    "--separate-git-dir",
    "--namespace",
    "--recurse-submodules",
    "--recursive",
    "--shallow-submodules",
];

/// Short git options that take a program, configuration or directory
/// (`-u <upload-pack>`, `-c <name=value>`, `-C <path>`).
const GIT_DENIED_SHORT: &[char] = &['u', 'c', 'C'];

/// Configuration forced on every git child, over anything a repository
/// (possibly planted by a task) sets. Command-line configuration has the
/// highest precedence.
const GIT_FORCED_CONFIG: &[(&str, &str)] = &[
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("core.sshCommand", "false"),
    ("core.gitProxy", ""),
    ("protocol.allow", "never"),
    ("protocol.https.allow", "always"),
    ("protocol.http.allow", "always"),
    // `user`: allowed for a URL given on the command line, not for one a
    // repository names (a submodule), since git marks those as not from the user.
    ("protocol.file.allow", "user"),
];
// NOTE: multi-valued keys such as `remote.<name>.uploadpack`, and
// `core.worktree`, `include.path` and filter drivers, cannot be overridden
// this way: git still reads them from a planted `.git/config`. Only kernel
// confinement of the child bounds what they do.

/// A `shell_allow` entry, split into tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellEntry {
    /// The entry as written.
    pub raw: String,
    /// Its tokens, split like a command.
    pub tokens: Vec<String>,
    /// Whether the entry ends with a space: at least one more argument is required.
    pub needs_argument: bool,
    /// Whether a matching command reaches the network through the host's
    /// proxy (`{prefix: ..., network: true}`), rather than having none.
    pub network: bool,
}

impl ShellEntry {
    /// Parses one `shell_allow` entry.
    ///
    /// # Errors
    ///
    /// Returns why the entry can never match a command.
    pub fn parse(raw: &str) -> Result<ShellEntry, String> {
        let tokens = split_command(raw)?;
        Ok(ShellEntry {
            raw: raw.to_owned(),
            tokens,
            needs_argument: raw.ends_with(' '),
            network: false,
        })
    }

    fn matches(&self, argv: &[String]) -> bool {
        let required = self.tokens.len() + usize::from(self.needs_argument);
        argv.len() >= required && argv[..self.tokens.len()] == self.tokens[..]
    }
}

/// Splits a command into arguments with POSIX quoting rules, rejecting
/// anything a shell would interpret instead of passing on.
///
/// # Errors
///
/// Returns which unquoted shell syntax the command contains, or why it does
/// not split (an unclosed quote, an empty command).
pub fn split_command(command: &str) -> Result<Vec<String>, String> {
    #[derive(PartialEq)]
    enum Quote {
        None,
        Single,
        Double,
    }

    if command.contains('\0') {
        return Err("the command contains a NUL byte".into());
    }

    let mut quote = Quote::None;
    let mut escaped = false;
    let mut word_start = true;
    for c in command.chars() {
        if escaped {
            escaped = false;
            word_start = false;
            continue;
        }
        match quote {
            Quote::Single => {
                if c == '\'' {
                    quote = Quote::None;
                }
            }
            Quote::Double => match c {
                '"' => quote = Quote::None,
                '\\' => escaped = true,
                // Expanded by a shell even inside double quotes.
                '$' | '`' => return Err(format!("`{c}` inside double quotes would be expanded by a shell")),
                _ => {}
            },
            Quote::None => {
                match c {
                    '\\' => escaped = true,
                    '\'' => quote = Quote::Single,
                    '"' => quote = Quote::Double,
                    ' ' | '\t' => {
                        word_start = true;
                        continue;
                    }
                    '~' | '#' if word_start => {
                        return Err(format!(
                            "unquoted `{c}` at the start of a word is shell syntax; quote it"
                        ));
                    }
                    c if SHELL_SYNTAX.contains(&c) => {
                        let shown = if c == '\n' {
                            "\\n".to_string()
                        } else if c == '\r' {
                            "\\r".to_string()
                        } else {
                            c.to_string()
                        };
                        return Err(format!(
                            "unquoted `{shown}` is shell syntax, which is not interpreted; quote it or remove it"
                        ));
                    }
                    _ => {}
                }
                word_start = false;
            }
        }
    }

    let argv = shell_words::split(command).map_err(|e| format!("cannot split the command: {e}"))?;
    if argv.is_empty() {
        return Err("the command is empty".into());
    }
    Ok(argv)
}

/// Policy rules for shell calls.
#[derive(Debug, Clone)]
pub struct ShellRules {
    /// Parsed `shell_allow`.
    pub entries: Vec<ShellEntry>,
    /// Directories searched for programs (`shell_path`).
    pub search_path: Vec<PathBuf>,
    /// Extra environment variables for children (`shell_env`).
    pub env: BTreeMap<String, String>,
    /// `paths_allow`, for working directories and path arguments.
    pub paths_allow: Vec<AllowedPath>,
    /// Empty directory, not writable by tasks, used as the children's HOME.
    pub home: PathBuf,
}

/// An approved call, ready to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The program, absolute.
    pub program: PathBuf,
    /// The arguments as split, `argv[0]` first.
    pub argv: Vec<String>,
    /// The working directory, canonical.
    pub cwd: PathBuf,
    /// The whole environment of the child.
    pub env: Vec<(String, String)>,
    /// Whether the child reaches the network through the proxy.
    pub network: bool,
}

impl ShellRules {
    /// Checks a call and returns how to run it.
    ///
    /// # Errors
    ///
    /// Returns why the call is denied, naming the rule.
    pub fn plan(&self, command: &str, cwd: Option<&str>) -> Result<Plan, String> {
        let argv = split_command(command)?;
        let entry = self
            .entries
            .iter()
            .filter(|e| e.matches(&argv))
            .max_by_key(|e| e.tokens.len())
            .ok_or_else(|| {
                let mut reason = format!("{:?} matches no shell_allow entry", shell_words::join(&argv));
                // The command is an entry's prefix without the argument it requires.
                if let Some(entry) = self.entries.iter().find(|e| e.needs_argument && e.tokens == argv) {
                    reason.push_str(&format!(
                        "; the entry {:?} requires at least one more argument",
                        entry.raw
                    ));
                }
                reason
            })?;

        let cwd = self.working_directory(cwd)?;
        let program = self.program(&argv[0], entry, &cwd)?;

        // The entry's own tokens were written by the operator; everything
        // after them came from the task.
        let task_arguments = &argv[entry.tokens.len().max(1)..];
        for argument in task_arguments {
            self.check_argument(argument, &cwd)?;
        }

        // A wrapper such as `timeout 30 git clone` runs git too.
        let is_git = std::iter::once(program.as_path())
            .chain(argv.iter().map(Path::new))
            .any(|path| path.file_name().is_some_and(|name| name == "git"));
        if is_git {
            check_git_arguments(task_arguments)?;
        }

        Ok(Plan {
            env: self.environment(is_git),
            network: entry.network,
            program,
            argv,
            cwd,
        })
    }

    fn working_directory(&self, requested: Option<&str>) -> Result<PathBuf, String> {
        let Some(requested) = requested else {
            return self
                .paths_allow
                .first()
                .map(|p| p.path.clone())
                .ok_or_else(|| "no working directory: paths_allow is empty".to_string());
        };
        let path = Path::new(requested);
        if !path.is_absolute() {
            return Err(format!(
                "working directory {requested:?} must be an absolute path"
            ));
        }
        let resolved = path
            .canonicalize()
            .map_err(|e| format!("working directory {requested:?}: {e}"))?;
        if !resolved.is_dir() {
            return Err(format!("working directory {requested:?} is not a directory"));
        }
        if !self.inside_allowed(&resolved) {
            return Err(format!(
                "working directory {requested:?} resolves to {}, outside paths_allow",
                resolved.display()
            ));
        }
        Ok(resolved)
    }

    fn program(&self, name: &str, entry: &ShellEntry, cwd: &Path) -> Result<PathBuf, String> {
        #[cfg(windows)]
        if super::exec::CMD_BUILTINS.contains(&name.to_ascii_lowercase().as_str()) {
            return Ok(PathBuf::from(name));
        }
        if name.contains('/') {
            // A path is allowed only when the entry names exactly that path.
            if entry.tokens.first().map(String::as_str) != Some(name) {
                return Err(format!(
                    "program {name:?} is a path; only programs found on shell_path may run"
                ));
            }
            let path = cwd.join(name);
            return if is_executable(&path) {
                Ok(path)
            } else {
                Err(format!("program {name:?} is not an executable file"))
            };
        }
        self.search_path
            .iter()
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(|| format!("program {name:?} was not found on shell_path"))
    }

    fn check_argument(&self, argument: &str, cwd: &Path) -> Result<(), String> {
        for candidate in path_candidates(argument) {
            let candidate = candidate.as_str();
            let lexical = if Path::new(candidate).is_absolute() {
                PathBuf::from(candidate)
            } else {
                cwd.join(candidate)
            };
            let suspicious = Path::new(candidate).is_absolute()
                || Path::new(candidate)
                    .components()
                    .any(|c| c == Component::ParentDir)
                || goes_through_symlink(cwd, candidate);
            if !suspicious {
                continue;
            }
            let resolved = resolve_lenient(&lexical);
            if !self.inside_allowed(&resolved) {
                return Err(format!(
                    "argument {argument:?} refers to {}, outside paths_allow",
                    resolved.display()
                ));
            }
        }
        Ok(())
    }

    fn inside_allowed(&self, path: &Path) -> bool {
        self.paths_allow
            .iter()
            .any(|allowed| path.starts_with(&allowed.path))
    }

    fn environment(&self, git: bool) -> Vec<(String, String)> {
        let path = self
            .search_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        // HOME is an empty directory the task cannot write, so a planted
        // `.curlrc`, `.gitconfig` or Python user site cannot change what an
        // allowed program does.
        let home = self.home.display().to_string();
        let mut env = vec![
            ("PATH".to_string(), path),
            ("HOME".to_string(), home.clone()),
            ("XDG_CONFIG_HOME".to_string(), home.clone()),
            ("CURL_HOME".to_string(), home),
            ("PYTHONNOUSERSITE".to_string(), "1".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ];
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));

        if git {
            env.push(("GIT_CONFIG_NOSYSTEM".into(), "1".into()));
            env.push(("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()));
            env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
            env.push(("GIT_ALLOW_PROTOCOL".into(), "https:http:file".into()));
            // Git must not find a repository above the allowed directories.
            let ceilings: Vec<String> = self
                .paths_allow
                .iter()
                .filter_map(|p| p.path.parent().map(|parent| parent.display().to_string()))
                .collect();
            env.push(("GIT_CEILING_DIRECTORIES".into(), ceilings.join(":")));
            env.push(("GIT_CONFIG_COUNT".into(), GIT_FORCED_CONFIG.len().to_string()));
            for (index, (key, value)) in GIT_FORCED_CONFIG.iter().enumerate() {
                env.push((format!("GIT_CONFIG_KEY_{index}"), (*key).into()));
                env.push((format!("GIT_CONFIG_VALUE_{index}"), (*value).into()));
            }
        }
        env
    }
}

/// Returns the parts of an argument that may name a file: the argument
/// itself, the value of `--option=VALUE` and `-XVALUE`, and the path of a
/// `file://` URL in any of them.
fn path_candidates(argument: &str) -> Vec<String> {
    let mut candidates = vec![argument.to_owned()];
    if let Some(long) = argument.strip_prefix("--") {
        if let Some((_, value)) = long.split_once('=') {
            candidates.push(value.to_owned());
        }
    } else if let Some(short) = argument.strip_prefix('-') {
        // In a group of short options (`-uo/x`) the value may follow any letter.
        for (offset, _) in short.char_indices().skip(1) {
            candidates.push(short[offset..].to_owned());
        }
    } else if let Some((_, value)) = argument.split_once('=') {
        // `name=value` operands, as in `dd if=/path`.
        candidates.push(value.to_owned());
    }

    let mut extra = Vec::new();
    for candidate in &candidates {
        // `@file` reads a file in curl and many other tools.
        if let Some(file) = candidate.strip_prefix('@') {
            extra.push(file.to_owned());
        }
        if let Some(path) = file_url_path(candidate) {
            extra.push(path);
        }
    }
    candidates.extend(extra);
    candidates
}

/// Returns the local path of a `file:` URL, percent-decoded, whatever its host.
fn file_url_path(text: &str) -> Option<String> {
    let rest = text
        .get(..5)
        .filter(|scheme| scheme.eq_ignore_ascii_case("file:"))
        .map(|_| &text[5..])?;
    let path = match rest.strip_prefix("//") {
        Some(authority_and_path) => authority_and_path
            .find('/')
            .map_or("/", |at| &authority_and_path[at..]),
        None => rest,
    };
    Some(percent_decode(path))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(hex) = text.get(index + 1..index + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            index += 3;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Returns whether `relative`, taken from `cwd`, passes through a symlink.
fn goes_through_symlink(cwd: &Path, relative: &str) -> bool {
    let mut current = cwd.to_path_buf();
    for component in Path::new(relative).components() {
        if let Component::Normal(part) = component {
            current.push(part);
            match current.symlink_metadata() {
                Ok(meta) if meta.file_type().is_symlink() => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }
    false
}

/// Resolves `path` as far as it exists (following symlinks), then applies
/// the remaining components lexically.
fn resolve_lenient(path: &Path) -> PathBuf {
    let components: Vec<Component> = path.components().collect();
    for split in (0..=components.len()).rev() {
        let existing: PathBuf = components[..split].iter().collect();
        let Ok(mut result) = existing.canonicalize() else {
            continue;
        };
        for component in &components[split..] {
            match component {
                Component::ParentDir => {
                    result.pop();
                }
                Component::Normal(part) => result.push(part),
                _ => {}
            }
        }
        return result;
    }
    path.to_path_buf()
}

fn check_git_arguments(arguments: &[String]) -> Result<(), String> {
    for argument in arguments {
        if argument.contains("ext::") || argument.contains("fd::") {
            return Err(format!(
                "git argument {argument:?} uses the ext:: or fd:: transport, which runs programs"
            ));
        }
        if let Some(long) = argument.strip_prefix("--") {
            let name = long.split_once('=').map_or(long, |(name, _)| name);
            // git accepts any unambiguous prefix of a long option, so
            // `--upload-pa` is `--upload-pack`.
            let denied = !name.is_empty() && GIT_DENIED_LONG.iter().any(|d| d[2..].starts_with(name));
            if denied {
                return Err(format!(
                    "git option --{name} (or the option it abbreviates) can run programs, load configuration or reach other repositories; name it in shell_allow to allow it"
                ));
            }
        } else if let Some(short) = argument.strip_prefix('-')
            && let Some(letter) = short.chars().find(|c| GIT_DENIED_SHORT.contains(c))
        {
            return Err(format!(
                "git option -{letter} (in {argument:?}) can run programs, load configuration or change directory; name it in shell_allow to allow it"
            ));
        }
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_follows_posix_quoting() {
        assert_eq!(
            split_command("git clone 'a b' \"c d\" e\\ f").unwrap(),
            ["git", "clone", "a b", "c d", "e f"]
        );
        assert_eq!(
            split_command("echo ';' '|' \"&&\"").unwrap(),
            ["echo", ";", "|", "&&"]
        );
        assert_eq!(split_command("echo 'a$(b)'").unwrap(), ["echo", "a$(b)"]);
    }

    #[test]
    fn shell_syntax_denied() {
        for command in [
            "git pull; rm -rf /",
            "git pull | sh",
            "git pull & sleep 1",
            "git pull && id",
            "echo $(id)",
            "echo `id`",
            "echo > /tmp/x",
            "cat < /etc/passwd",
            "git pull\nid",
            "ls *",
            "ls ?",
            "ls [a]",
            "echo {a,b}",
            "echo ~/x",
            "echo \"$HOME\"",
            "echo \"`id`\"",
            "echo $HOME",
            "(id)",
            "echo 'unclosed",
            "",
            "   ",
        ] {
            assert!(split_command(command).is_err(), "{command:?}");
        }
    }

    #[test]
    fn entry_matches_token_prefix() {
        let pull = ShellEntry::parse("git pull").unwrap();
        let argv = |s: &str| split_command(s).unwrap();
        assert!(pull.matches(&argv("git pull")));
        assert!(pull.matches(&argv("git pull origin main")));
        assert!(!pull.matches(&argv("git pullx")));
        assert!(!pull.matches(&argv("git push")));
        assert!(!pull.matches(&argv("git")));

        let clone = ShellEntry::parse("git clone ").unwrap();
        assert!(clone.needs_argument);
        assert!(
            !clone.matches(&argv("git clone")),
            "a trailing space requires an argument"
        );
        assert!(clone.matches(&argv("git clone https://example.com/r.git")));
        assert!(
            clone.matches(&argv("git 'clone' x")),
            "quoting does not change the tokens"
        );
    }

    #[test]
    fn path_candidates_cover_option_values() {
        assert_eq!(path_candidates("--output=/etc/x"), ["--output=/etc/x", "/etc/x"]);
        assert!(path_candidates("-C/etc").contains(&"/etc".to_string()));
        assert_eq!(
            path_candidates("file:///etc/passwd"),
            ["file:///etc/passwd", "/etc/passwd"]
        );
        assert_eq!(
            path_candidates("--repo=file:///etc"),
            ["--repo=file:///etc", "file:///etc", "/etc"]
        );
    }

    #[test]
    fn git_options_that_run_programs_denied() {
        let args = |s: &str| split_command(s).unwrap();
        for bad in [
            "--upload-pack=touch /tmp/x",
            "--upload-pack x",
            "-u x",
            "-qu x",
            "-c core.sshCommand=x",
            "--config core.x=y",
            "--template=/tmp/t",
            "-C /tmp",
            "ext::sh -c id",
            "fd::3",
            "--exec=x",
            "--upload-pa=x",
            "--conf=x",
            "--templa=x",
            "--separate-git=x",
            "--recurse-submodules",
            "--rec",
        ] {
            assert!(check_git_arguments(&args(bad)).is_err(), "{bad}");
        }
        assert!(check_git_arguments(&args("--depth 1 --branch main https://example.com/r.git dir")).is_ok());
    }

    #[test]
    fn lenient_resolution_handles_missing_parts() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        assert_eq!(resolve_lenient(&base.join("missing/../x")), base.join("x"));
        assert_eq!(resolve_lenient(&base.join("a/b/c")), base.join("a/b/c"));
    }
}
