//! placeholder until the module lands.
pub struct SharedDict;
impl std::fmt::Debug for SharedDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedDict")
    }
}
pub fn dict(_name: &str, _capacity: usize) -> std::sync::Arc<SharedDict> {
    std::sync::Arc::new(SharedDict)
}
pub fn register(_lua: &mlua::Lua, _ngx: &mlua::Table, _d: &[(String, std::sync::Arc<SharedDict>)]) -> mlua::Result<()> {
    Ok(())
}
