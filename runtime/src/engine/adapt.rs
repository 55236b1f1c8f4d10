//! WASI preview-1 core modules turned into components.
//!
//! Go (`GOOS=wasip1`), Zig, AssemblyScript and older toolchains produce core
//! modules that import `wasi_snapshot_preview1`. Wrapping such a module with
//! wasmtime's preview-1 adapter gives a WASI 0.2 component, which then takes
//! the one run path every plugin takes, under the same capability rules.
//!
//! The adapter is the one released with the wasmtime version the server is
//! built with, so the interfaces it imports are the ones the linker provides.

use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
    WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};
use wasmparser::{ExternalKind, Parser, Payload};

/// Most imports a preview-1 module may have. The interface has 46 functions,
/// and toolchains import some twice (Go imports `fd_write` twice);
/// wit-component renames duplicates in time quadratic in their number.
const MAX_IMPORTS: usize = 256;

/// Prefix of the custom sections in which `wit-bindgen` embeds the WIT world
/// a module was built for.
const COMPONENT_TYPE_SECTION: &str = "component-type";

/// The imports, exports and custom sections of a core module that decide how
/// it is adapted.
#[derive(Debug, Default)]
pub struct ModuleShape {
    /// Exports `_start`: a command with a `main`.
    pub has_start: bool,
    /// Exports its memory as `memory`, which the adapter needs.
    pub has_memory: bool,
    /// Carries a WIT world embedded by `wit-bindgen`.
    pub has_world: bool,
    /// Imports from modules other than `wasi_snapshot_preview1`, as
    /// `module::name`.
    pub foreign_imports: Vec<String>,
    /// Number of imports.
    pub imports: usize,
}

/// Reads the imports, exports and custom sections of a core module.
///
/// # Errors
///
/// Fails with the parser's message when the bytes are not a valid module.
pub fn inspect(module: &[u8]) -> Result<ModuleShape, String> {
    let mut shape = ModuleShape::default();
    for payload in Parser::new(0).parse_all(module) {
        match payload.map_err(|e| e.to_string())? {
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import.map_err(|e| e.to_string())?;
                    shape.imports += 1;
                    if import.module != WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME {
                        shape
                            .foreign_imports
                            .push(format!("{}::{}", import.module, import.name));
                    }
                }
            }
            Payload::ExportSection(exports) => {
                for export in exports {
                    let export = export.map_err(|e| e.to_string())?;
                    match (export.name, export.kind) {
                        ("_start", ExternalKind::Func) => shape.has_start = true,
                        ("memory", ExternalKind::Memory) => shape.has_memory = true,
                        _ => {}
                    }
                }
            }
            Payload::CustomSection(section) if section.name().starts_with(COMPONENT_TYPE_SECTION) => {
                shape.has_world = true;
            }
            _ => {}
        }
    }
    Ok(shape)
}

/// Makes a component of a preview-1 command module: one that imports only
/// from `wasi_snapshot_preview1` and exports `_start` and `memory`.
///
/// # Errors
///
/// Returns why the module is not such a command, or the adapter's error.
pub fn command_component(module: &[u8]) -> Result<Vec<u8>, String> {
    let shape = inspect(module)?;
    check_adaptable(&shape)?;
    if !shape.has_start {
        return Err("it exports no `_start` function, so it is not a command".into());
    }
    if shape.has_world {
        return Err(
            "it carries a WIT world from wit-bindgen; make it a component with `apex component new` before uploading"
                .into(),
        );
    }
    encode(module, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER)
}

/// Makes a component of any core module built for preview 1: a command when
/// it exports `_start`, else a reactor whose exports come from the WIT world
/// that `wit-bindgen` embedded in it.
///
/// # Errors
///
/// Returns why the module cannot become a component.
pub fn component(module: &[u8]) -> Result<Vec<u8>, String> {
    match module.get(..8) {
        Some([0, b'a', b's', b'm', _, _, 0, 0]) => {}
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => return Err("it is a component already".into()),
        _ => return Err("it is not a WebAssembly binary".into()),
    }
    let shape = inspect(module)?;
    check_adaptable(&shape)?;
    let adapter = if shape.has_start {
        WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER
    } else if shape.has_world {
        WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER
    } else {
        return Err(
            "the module exports no `_start` and carries no WIT world, so it would be a component that does nothing; build it as a command or with wit-bindgen".into(),
        );
    };
    encode(module, adapter)
}

/// Checks what every module must meet before the adapter is applied.
fn check_adaptable(shape: &ModuleShape) -> Result<(), String> {
    if shape.imports > MAX_IMPORTS {
        return Err(format!(
            "it has {} imports, more than the {MAX_IMPORTS} a preview-1 module may have",
            shape.imports
        ));
    }
    if !shape.has_memory {
        return Err("it exports no memory named `memory`, which the adapter needs".into());
    }
    // A wit-bindgen world declares imports of its own interfaces; without
    // one, only preview 1 can be adapted.
    if let (false, Some(import)) = (shape.has_world, shape.foreign_imports.first()) {
        return Err(format!(
            "it imports `{import}`, and a preview-1 module without a wit-bindgen world may import only from `{WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME}`"
        ));
    }
    Ok(())
}

fn encode(module: &[u8], adapter: &[u8]) -> Result<Vec<u8>, String> {
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(module)
        .and_then(|encoder| encoder.adapter(WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, adapter))
        .and_then(|mut encoder| encoder.encode())
        .map_err(|e| format!("{e:#}"))
}
