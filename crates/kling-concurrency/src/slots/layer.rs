//! [`TaskSlotsLayer`].

use std::sync::Arc;
use std::time::Duration;

use kling_core::{AccountId, PoolScope};
use tower_layer::Layer;

use super::handle::SlotsHandle;
use super::service::TaskSlots;
use crate::backend::{InProcess, SlotBackend};
use crate::config::SlotsConfig;
use crate::error::ConfigError;

/// What the service needs of the configuration on every request.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) lease: Duration,
    pub(crate) default_account: AccountId,
    pub(crate) pool_scope: PoolScope,
}

impl Settings {
    fn of(config: &SlotsConfig) -> Self {
        Settings {
            lease: config.lease,
            // Interned (one of the few names a process is configured with): every request
            // without an account of its own clones it, a copy rather than a reference count.
            default_account: AccountId::interned(config.default_account.as_str()),
            pool_scope: config.pool_scope,
        }
    }
}

/// Applies [`TaskSlots`] to a service. See the [module docs](crate::slots).
///
/// # Clone
///
/// Clones share the backend (and so every slot, lease, halt and capacity) and the settings.
#[derive(Clone, Debug)]
pub struct TaskSlotsLayer<B = InProcess> {
    backend: B,
    settings: Arc<Settings>,
}

impl TaskSlotsLayer<InProcess> {
    /// A layer with an in-process backend.
    pub fn new(config: SlotsConfig) -> Result<Self, ConfigError> {
        let settings = Settings::of(&config);
        let backend = InProcess::new(config)?;
        Ok(TaskSlotsLayer {
            backend,
            settings: Arc::new(settings),
        })
    }

    /// A layer with an in-process backend, and the handle that feeds it callbacks, reconciles,
    /// resets halts, changes capacities and takes snapshots.
    pub fn pair(config: SlotsConfig) -> Result<(Self, SlotsHandle<InProcess>), ConfigError> {
        let layer = TaskSlotsLayer::new(config)?;
        let handle = layer.handle();
        Ok((layer, handle))
    }
}

impl<B: SlotBackend> TaskSlotsLayer<B> {
    /// A layer over any backend; `config` gives the lease and the default account (the backend
    /// keeps the capacities).
    pub fn with_backend(config: &SlotsConfig, backend: B) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(TaskSlotsLayer {
            backend,
            settings: Arc::new(Settings::of(config)),
        })
    }

    /// A handle on this layer's slots.
    pub fn handle(&self) -> SlotsHandle<B> {
        SlotsHandle::new(self.backend.clone(), self.settings.clone())
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<S, B: SlotBackend> Layer<S> for TaskSlotsLayer<B> {
    type Service = TaskSlots<S, B>;

    fn layer(&self, inner: S) -> TaskSlots<S, B> {
        TaskSlots::new(inner, self.backend.clone(), self.settings.clone())
    }
}
