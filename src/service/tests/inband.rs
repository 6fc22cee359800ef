//! The inband document API: who may use a twin's documents through the broker, and the
//! addresses requests come on.
//!
//! Requests are run the way the inband handler runs them: the address is parsed with
//! [`inband::parse`] and the documents use case is called with the channel the device
//! published on ([`Access::Channel`]) or as a trusted caller ([`Access::Trusted`]).

use serde_json::{Map, json};

use super::super::ServiceError;
use super::super::documents::{Access, Change};
use super::super::inband::{self, Op, Target};
use super::super::twins::TwinUpdate;
use super::{ALICE, BOB, Fixture, definition, object};
use crate::domain::twin::Twin;
use crate::service::documents::Documents as _;
use crate::service::twins::Twins as _;

/// The target of `twins.<twin>.<document>.<op>`.
fn target(address: &str) -> Target<'_> {
    inband::parse(address).unwrap_or_else(|| panic!("{address} does not parse"))
}

async fn bound_twin(f: &Fixture) -> Twin {
    f.twin(ALICE, "pump", &[("temp", "device-ch", "engine")])
        .await
}

/// Runs a put request on `address` for `access`.
async fn put(f: &Fixture, access: Access<'_>, address: &str) -> Result<i64, ServiceError> {
    let t = target(address);
    assert_eq!(t.op, Op::Put);
    f.documents
        .write(
            access,
            t.twin_id,
            t.document,
            Change::Put(object(json!({"on": true}))),
            None,
        )
        .await
        .map(|(doc, _)| doc.version)
}

#[test]
fn every_operation_parses_from_its_address() {
    let id = uuid::Uuid::new_v4().to_string();
    for (op, want) in [
        ("get", Op::Get),
        ("put", Op::Put),
        ("patch", Op::Patch),
        ("delete", Op::Delete),
    ] {
        let address = format!("twins.{id}.desired.{op}");
        assert_eq!(
            inband::parse(&address),
            Some(Target {
                twin_id: &id,
                document: "desired",
                op: want
            })
        );
        for answer in ["success", "error"] {
            let response = format!("{address}.response.{answer}");
            assert_eq!(inband::parse(&response), None, "{response}");
        }
    }
    for bad in [
        "twins",
        "twins..",
        "twins.a.b.GET",
        "twin.a.b.get",
        "twins.a.b.c.get",
    ] {
        assert_eq!(inband::parse(bad), None, "{bad}");
    }
}

#[tokio::test]
async fn a_channel_bound_by_the_current_definition_may_use_the_documents() {
    let f = Fixture::new();
    let t = bound_twin(&f).await;
    let device = Access::Channel("device-ch");
    assert_eq!(
        put(&f, device, &format!("twins.{}.desired.put", t.id))
            .await
            .unwrap(),
        1
    );
    let address = format!("twins.{}.desired.get", t.id);
    let get = target(&address);
    let doc = f
        .documents
        .get(device, get.twin_id, get.document)
        .await
        .unwrap();
    assert_eq!(doc.data, object(json!({"on": true})));
    assert_eq!(f.documents.list(device, &t.id).await.unwrap().len(), 1);
    assert_eq!(
        f.documents
            .delete(device, &t.id, "desired", Some(1))
            .await
            .unwrap(),
        doc
    );
}

#[tokio::test]
async fn another_channel_may_not_use_the_documents() {
    let f = Fixture::new();
    let t = bound_twin(&f).await;
    let stranger = Access::Channel("other-ch");
    let err = put(&f, stranger, &format!("twins.{}.desired.put", t.id))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
    let owner = Access::Owner(ALICE);
    assert!(f.documents.list(owner, &t.id).await.unwrap().is_empty());
    put(&f, owner, &format!("twins.{}.desired.put", t.id))
        .await
        .unwrap();
    let err = f
        .documents
        .get(stranger, &t.id, "desired")
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
    let err = f
        .documents
        .delete(stranger, &t.id, "desired", None)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
    assert_eq!(f.documents.list(owner, &t.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_channel_bound_only_by_an_older_definition_may_not() {
    let f = Fixture::new();
    let t = bound_twin(&f).await;
    let update = TwinUpdate {
        definition: Some(definition(&[("temp", "new-ch", "")], 0)),
        ..TwinUpdate::default()
    };
    f.twins.update(ALICE, &t.id, update).await.unwrap();
    let address = format!("twins.{}.desired.put", t.id);
    let err = put(&f, Access::Channel("device-ch"), &address)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound), "{err:?}");
    assert_eq!(
        put(&f, Access::Channel("new-ch"), &address).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn trusted_callers_may_use_any_owners_twin() {
    let f = Fixture::new();
    let alices = bound_twin(&f).await;
    let bobs = f.twin(BOB, "fan", &[]).await;
    for t in [&alices, &bobs] {
        let address = format!("twins.{}.desired.put", t.id);
        assert_eq!(put(&f, Access::Trusted, &address).await.unwrap(), 1);
    }
    let patched = f
        .documents
        .write(
            Access::Trusted,
            &bobs.id,
            "desired",
            Change::Patch(object(json!({"speed": 2}))),
            Some(1),
        )
        .await
        .unwrap()
        .0;
    assert_eq!(patched.data, object(json!({"on": true, "speed": 2})));
}

#[tokio::test]
async fn an_address_naming_no_twin_or_a_bad_document_is_refused() {
    let f = Fixture::new();
    let t = bound_twin(&f).await;
    let missing = uuid::Uuid::new_v4().to_string();
    for twin_id in ["not-a-uuid", missing.as_str()] {
        let address = format!("twins.{twin_id}.desired.get");
        let get = target(&address);
        let err = f
            .documents
            .get(Access::Trusted, get.twin_id, get.document)
            .await
            .unwrap_err();
        assert!(matches!(err, ServiceError::NotFound), "{address}: {err:?}");
    }
    // Inband document names follow the same rule as over HTTP.
    let err = f
        .documents
        .write(
            Access::Channel("device-ch"),
            &t.id,
            "bad*name",
            Change::Put(Map::new()),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::Invalid(_)), "{err:?}");
}
