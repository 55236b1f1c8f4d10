//! The plugins the server can run: compiled in memory, stored on disk.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;

use crate::engine::{CompileError, CompiledPlugin, Engine, SourceFormat};
use crate::store::{ArtifactRecord, PluginRecord, PluginStore};

/// Compiles that may run at once. Compiling is CPU-bound and wasmtime already
/// compiles functions in parallel, so more would only slow runs down.
const CONCURRENT_COMPILES: usize = 1;

/// Serialises `compiled` and records the artifact's engine and digest in
/// `record`; returns the bytes to store.
fn cache_artifact(
    engine: &Engine,
    compiled: &CompiledPlugin,
    record: &mut PluginRecord,
) -> anyhow::Result<Vec<u8>> {
    let artifact = compiled.artifact()?;
    record.artifact = Some(ArtifactRecord {
        engine: engine.compatibility_key(),
        sha256: crate::auth::sha256_hex(&artifact),
    });
    Ok(artifact)
}

/// A plugin ready to run.
pub struct LoadedPlugin {
    /// The stored record.
    pub record: PluginRecord,
    /// The compiled, linked component.
    pub compiled: CompiledPlugin,
}

/// Failure of an upload.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The component is unusable.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The host failed to compile or store it.
    #[error("{0}")]
    Host(String),
}

/// Compiled plugins by name, backed by a [`PluginStore`].
pub struct Registry {
    engine: Arc<Engine>,
    store: Arc<PluginStore>,
    plugins: RwLock<HashMap<String, Arc<LoadedPlugin>>>,
    /// Bounds the compile workers running at once. A worker whose upload is
    /// abandoned is killed, and its permit returns.
    compiles: Arc<Semaphore>,
    /// Address space of a compile worker, in bytes (`limits.compile_mib`).
    compile_memory_bytes: u64,
    changes: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Creates a registry and loads every stored plugin.
    ///
    /// A plugin that fails to load is logged and left on disk, so one bad
    /// file cannot keep the server from starting.
    pub async fn load(
        engine: Arc<Engine>,
        store: Arc<PluginStore>,
        compile_memory_bytes: u64,
    ) -> std::io::Result<Registry> {
        let registry = Registry {
            engine,
            store,
            plugins: RwLock::new(HashMap::new()),
            compiles: Arc::new(Semaphore::new(CONCURRENT_COMPILES)),
            compile_memory_bytes,
            changes: tokio::sync::Mutex::new(()),
        };

        let records = {
            let store = registry.store.clone();
            tokio::task::spawn_blocking(move || store.list())
                .await
                .map_err(std::io::Error::other)??
        };
        for record in records {
            let name = record.name.clone();
            match registry.load_stored(record).await {
                Ok((plugin, source)) => {
                    tracing::info!(plugin = %name, sha256 = %plugin.record.sha256, "loaded plugin {source}");
                    registry.insert(plugin);
                }
                Err(e) => {
                    tracing::error!(plugin = %name, error = %e, "cannot load stored plugin; it stays on disk but cannot run")
                }
            }
        }
        Ok(registry)
    }

    /// Loads a stored plugin from its cached compiled code, or compiles it
    /// again (and caches the result) when that code is missing, stale or
    /// altered. Returns the plugin and where its code came from.
    async fn load_stored(&self, record: PluginRecord) -> Result<(LoadedPlugin, &'static str), String> {
        let engine = self.engine.clone();
        let store = self.store.clone();
        let candidate = record.clone();
        let cached = tokio::task::spawn_blocking(move || {
            let record = candidate;
            let key = engine.compatibility_key();
            let artifact = store.read_artifact(&record, &key)?;
            match engine.load_artifact(&artifact) {
                Ok(compiled) => Some(LoadedPlugin { record, compiled }),
                Err(e) => {
                    tracing::warn!(plugin = %record.name, error = %e, "cannot load stored compiled code; compiling again");
                    None
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        if let Some(plugin) = cached {
            return Ok((plugin, "from cached compiled code"));
        }

        let permit = self
            .compiles
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let engine = self.engine.clone();
        let store = self.store.clone();
        let plugin = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let wasm = store.read_wasm(&record).map_err(|e| e.to_string())?;
            let compiled = engine.compile(&wasm).map_err(|e| e.to_string())?;
            let mut record = record;
            match cache_artifact(&engine, &compiled, &mut record) {
                Ok(artifact) => {
                    if let Err(e) = store.save_artifact(&record, &artifact) {
                        tracing::warn!(plugin = %record.name, error = %e, "cannot store compiled code; it is compiled again at the next start");
                    }
                }
                Err(e) => tracing::warn!(plugin = %record.name, error = %e, "cannot serialise compiled code"),
            }
            Ok::<_, String>(LoadedPlugin { record, compiled })
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok((plugin, "after compiling it"))
    }

    fn insert(&self, plugin: LoadedPlugin) {
        let mut plugins = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        plugins.insert(plugin.record.name.clone(), Arc::new(plugin));
    }

    /// Returns the plugin called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Returns the records of all plugins, sorted by name.
    pub fn records(&self) -> Vec<PluginRecord> {
        let plugins = self.plugins.read().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<PluginRecord> = plugins.values().map(|p| p.record.clone()).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// Validates, compiles and stores a component under `name`, replacing
    /// any plugin of that name. Nothing changes when a step fails.
    ///
    /// # Errors
    ///
    /// [`UploadError::Compile`] when the component is unusable,
    /// [`UploadError::Host`] when the server fails to store it.
    pub async fn upload(&self, name: &str, wasm: bytes::Bytes) -> Result<PluginRecord, UploadError> {
        let compiled = {
            let _permit = self
                .compiles
                .acquire()
                .await
                .map_err(|e| UploadError::Host(e.to_string()))?;
            match self
                .engine
                .compile_in_worker(&wasm, self.compile_memory_bytes)
                .await
            {
                Ok(compiled) => compiled,
                Err(CompileError::Worker(e)) => return Err(UploadError::Host(e)),
                Err(e) => return Err(UploadError::Compile(e)),
            }
        };

        let mut record = PluginRecord {
            name: name.to_owned(),
            sha256: crate::auth::sha256_hex(&wasm),
            size: wasm.len() as u64,
            kind: compiled.kind(),
            format: SourceFormat::of(&wasm),
            uploaded_at: crate::unix_now(),
            artifact: None,
        };
        let artifact = cache_artifact(&self.engine, &compiled, &mut record)
            .map_err(|e| UploadError::Host(format!("cannot serialise the compiled component: {e}")))?;

        // Storing and publishing happen under one lock, so a concurrent
        // delete or upload of the same name cannot leave memory and disk apart.
        let _changes = self.changes.lock().await;
        let store = self.store.clone();
        let saved = record.clone();
        tokio::task::spawn_blocking(move || store.save(&saved, &wasm, Some(&artifact)))
            .await
            .map_err(|e| UploadError::Host(e.to_string()))?
            .map_err(|e| UploadError::Host(format!("cannot store the plugin: {e}")))?;

        self.insert(LoadedPlugin {
            record: record.clone(),
            compiled,
        });
        Ok(record)
    }

    /// Removes the plugin called `name`. Returns whether it existed.
    ///
    /// # Errors
    ///
    /// Fails when the stored record cannot be removed.
    pub async fn delete(&self, name: &str) -> std::io::Result<Option<PluginRecord>> {
        let _changes = self.changes.lock().await;
        let store = self.store.clone();
        let owned = name.to_owned();
        let existed = tokio::task::spawn_blocking(move || store.delete(&owned))
            .await
            .map_err(std::io::Error::other)??;

        let removed = self
            .plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Ok(if existed {
            removed.map(|p| p.record.clone())
        } else {
            None
        })
    }
}
