//! The OpenAPI 3 document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::pages::{StatesPage, TwinsPage};
use super::{documents, health, states, twins};
use crate::domain::document::{Difference, Document, DocumentSummary};
use crate::domain::history::{AttributeSummary, Change, StateDiff, StateInForce, WindowSummary};
use crate::domain::state::State;
use crate::domain::twin::{Attribute, Definition, DefinitionInput, Twin};
use crate::service::VersionMismatch;
use crate::service::documents::DeltaView;

#[derive(OpenApi)]
#[openapi(
    info(title = "twins", description = "Digital twins: definitions, states and documents"),
    paths(
        twins::create, twins::list, twins::view, twins::update, twins::remove,
        states::list, states::at, states::diff, states::summary, documents::list, documents::get, documents::put, documents::patch,
        documents::delete, documents::delta, health::health
    ),
    components(schemas(
        Twin, Definition, Attribute, DefinitionInput, State, TwinsPage, StatesPage,
        twins::TwinRequest, twins::TwinUpdateRequest, ErrorBody, health::Health, Document, DocumentSummary, Difference,
        DeltaView, VersionMismatch, documents::DocumentRequest, documents::DocumentList,
        StateInForce, StateDiff, Change, WindowSummary, AttributeSummary
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `GET /openapi.json`.
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
