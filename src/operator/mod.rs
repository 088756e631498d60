//! The Kubernetes operator.

use kube::CustomResourceExt;

use crate::cli::{CliError, Global, OperatorArgs};
use crate::spec::TransactionRelay;

/// The CustomResourceDefinition as YAML, as `txrelay crd` prints it.
pub fn crd_yaml() -> Result<String, String> {
    serde_saphyr::to_string(&TransactionRelay::crd()).map_err(|e| e.to_string())
}

pub async fn run(_global: &Global, _args: OperatorArgs) -> Result<(), CliError> {
    Err(CliError::failed("operator: not built yet"))
}
