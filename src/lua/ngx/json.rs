//! placeholder.
pub fn register(_lua: &mlua::Lua, _null: mlua::Value) -> mlua::Result<()> {
    Ok(())
}
