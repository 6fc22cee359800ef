//! Bodies of the listing endpoints: the Go service's shapes, and the document versions
//! listing in the same form.

use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::Page;
use crate::domain::document::VersionSummary;
use crate::domain::state::State;
use crate::domain::twin::Twin;

/// Page of twins as served by `GET /twins`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TwinsPage {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    pub twins: Vec<Twin>,
}

/// Page of states as served by `GET /states/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatesPage {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    pub states: Vec<State>,
}

impl From<Page<Twin>> for TwinsPage {
    fn from(p: Page<Twin>) -> Self {
        Self {
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            twins: p.items,
        }
    }
}

impl From<Page<State>> for StatesPage {
    fn from(p: Page<State>) -> Self {
        Self {
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            states: p.items,
        }
    }
}

/// Body of `GET /twins/{id}/documents/{name}/versions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionsPage {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    /// Newest first; the current version is the first of the first page.
    pub versions: Vec<VersionSummary>,
}

impl From<Page<VersionSummary>> for VersionsPage {
    fn from(p: Page<VersionSummary>) -> Self {
        Self {
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            versions: p.items,
        }
    }
}
