//! placeholder until the module lands.
pub fn register(_lua: &mlua::Lua, _ngx: &mlua::Table) -> mlua::Result<()> {
    Ok(())
}
