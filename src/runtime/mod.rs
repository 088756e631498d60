//! The assembly floor: where a relay's settings come together (the manifest
//! and environment for `txrelay run`, Secrets under the operator), where a
//! relay is built from them, and where running relays live: the
//! [`Supervisor`] starts, reconfigures and stops them, and its [`Registry`]
//! is the only record of what runs, which `/new` and the admin API resolve
//! against. Nothing below this floor (`relay`, `store`, `queue`) knows it.

pub mod config;
pub mod lifecycle;
pub mod registry;
pub mod settings;

pub use lifecycle::{Change, Companion, Supervisor, TokenRead};
pub use registry::{Registry, ResolveError};
pub use settings::{QueueSecrets, RelayHandle, RelaySettings, StartError};
