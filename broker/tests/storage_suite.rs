//! openraft's own storage conformance suite, run on the RocksDB log store
//! and the meta-group state machine (queue groups use the same log store;
//! their snapshot behaviour is covered by the cluster tests).

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use petrel_broker::log_store::LogStore;
use petrel_broker::meta::ClusterMap;
use petrel_broker::sm::{Kind, StateMachine};
use petrel_broker::storage::Store;
use petrel_broker::types::{RaftStorageError, TypeConfig, META_GROUP};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), RaftStorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open store");
        let (tx, _rx) = tokio::sync::watch::channel(Arc::new(ClusterMap::default()));
        let sm = StateMachine::open(META_GROUP, store.clone(), Kind::Meta(tx))?;
        Ok((dir, LogStore::new(META_GROUP, store), sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_rocksdb_log_store() {
    Suite::test_all(Builder).expect("openraft storage suite");
}
