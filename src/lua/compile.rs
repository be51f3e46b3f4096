//! Turning the config's `lua:` settings and route scripts into [`Script`]s:
//! read each file, syntax-check it in a scratch state, and report errors as
//! `FILE:LINE: message` (the same text `luagate check` prints).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use super::Script;

/// A script that failed to load: the message already carries the Lua
/// file:line when the error is a syntax error.
#[derive(Debug)]
pub struct ScriptError {
    pub message: String,
    /// For syntax errors in files: the file and line, so the config error points there.
    pub file_line: Option<(std::path::PathBuf, usize)>,
}

/// `value` is a file path when it is one line ending in `.lua`, else inline code.
pub fn is_file_ref(value: &str) -> bool {
    let v = value.trim();
    !v.contains('\n') && !v.contains(' ') && v.ends_with(".lua")
}

/// Load and syntax-check the script `value` (file path relative to `dir`, or inline code named `key`).
pub fn script(checker: &mlua::Lua, dir: &Path, key: &str, value: &str) -> Result<Arc<Script>, ScriptError> {
    let (name, source, path) = if is_file_ref(value) {
        let path = dir.join(value.trim());
        let source = std::fs::read(&path).map_err(|e| ScriptError {
            message: format!("cannot read Lua file {}: {e}", path.display()),
            file_line: None,
        })?;
        (path.display().to_string(), source, Some(path))
    } else {
        (key.to_string(), value.as_bytes().to_vec(), None)
    };
    if let Err(e) = checker.load(&source[..]).set_name(format!("@{name}")).into_function() {
        let message = lua_message(&e);
        let line = syntax_line(&message, &name);
        return Err(ScriptError { message, file_line: path.zip(line) });
    }
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    source.hash(&mut h);
    Ok(Arc::new(Script { name: Arc::from(name), source: Arc::from(source), id: h.finish() }))
}

/// The first line of a Lua error (mlua appends a traceback to some).
pub fn lua_message(e: &mlua::Error) -> String {
    let s = match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { cause, .. } => return lua_message(cause),
        other => other.to_string(),
    };
    s.lines().next().unwrap_or("").to_string()
}

/// `name:LINE: message` → LINE.
fn syntax_line(message: &str, name: &str) -> Option<usize> {
    let rest = message.strip_prefix(name)?.strip_prefix(':')?;
    rest.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_refs() {
        assert!(is_file_ref("lua/auth.lua"));
        assert!(!is_file_ref("ngx.say('x.lua')"));
        assert!(!is_file_ref("return 1\n-- a.lua"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let lua = mlua::Lua::new();
        let dir = std::env::temp_dir().join(format!("luagate-compile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.lua"), "local x = 1\nif then\n").unwrap();
        let err = script(&lua, &dir, "k", "bad.lua").unwrap_err();
        assert_eq!(err.file_line.as_ref().map(|(_, l)| *l), Some(2), "{}", err.message);
        assert!(err.message.contains("bad.lua:2:"), "{}", err.message);
        let ok = script(&lua, &dir, "routes[0].lua.access", "ngx.exit(403)").unwrap();
        assert_eq!(&*ok.name, "routes[0].lua.access");
        let inline = script(&lua, &dir, "routes[1].lua.access", "ngx.say(").unwrap_err();
        assert!(inline.message.starts_with("routes[1].lua.access:1:"), "{}", inline.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
