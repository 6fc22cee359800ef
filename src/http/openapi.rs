//! The OpenAPI 3 document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::pages::{StatesPage, TwinsPage, VersionsPage};
use super::{documents, events, health, metrics, states, twins};
use crate::domain::document::{
    Difference, Document, DocumentSummary, VersionSummary, WriteOp, Writer,
};
use crate::domain::history::{AttributeSummary, Change, StateDiff, StateInForce, WindowSummary};
use crate::domain::state::State;
use crate::domain::twin::{Attribute, Definition, DefinitionInput, Twin};
use crate::service::VersionMismatch;
use crate::service::documents::{DeltaView, RevisionDiff};

#[derive(OpenApi)]
#[openapi(
    info(title = "twins", description = "Digital twins: definitions, states and documents"),
    paths(
        twins::create, twins::list, twins::view, twins::update, twins::remove,
        states::list, states::at, states::diff, states::summary, documents::list, documents::get,
        documents::put, documents::patch, documents::delete, documents::delta,
        documents::versions, documents::diff, events::all, events::twin, health::health, health::live, health::ready,
        metrics::render, document
    ),
    components(schemas(
        Twin, Definition, Attribute, DefinitionInput, State, TwinsPage, StatesPage,
        twins::TwinRequest, twins::TwinUpdateRequest, ErrorBody, health::Health, health::ComponentCheck, health::Probe, Document, DocumentSummary, Difference,
        DeltaView, VersionMismatch, documents::DocumentRequest, documents::DocumentList,
        StateInForce, StateDiff, Change, WindowSummary, AttributeSummary,
        VersionsPage, VersionSummary, WriteOp, Writer, RevisionDiff,
        events::FeedSseEvent, events::ChangeEventBody, events::OverflowBody, events::CursorExpiredBody
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

/// This document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3 document of this service",
        content_type = "application/json", body = Object)))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Where the interactive documentation is served (Swagger UI, assets built in).
pub const DOCS_PATH: &str = "/docs";

/// Swagger UI at [`DOCS_PATH`], reading `/openapi.json`; its assets are compiled into
/// the binary, so it works without the internet.
pub fn docs() -> utoipa_swagger_ui::SwaggerUi {
    utoipa_swagger_ui::SwaggerUi::new(DOCS_PATH)
        .config(utoipa_swagger_ui::Config::from("/openapi.json"))
}
