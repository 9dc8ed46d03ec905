//! Operator decisions on an entity's pending approval: one implementation for every
//! front end (the gRPC server's ApproveAction/DenyAction, the Python API and the HTTP
//! side through it).
//!
//! A decision is a strict update of the `approval` component over the version read, in
//! the same table lock as the read: it replicates like any write, and a concurrent
//! decision made elsewhere loses or wins by the component's merge rule (a denial beats
//! an approval, either beats a pending request).
use crate::error::{Error, Result};
use crate::pb::{ApprovalComponent, ApprovalState, Entity};
use crate::table::{Table, WriteMode, WriteOutcome};
use prost::Message;

/// The component key of an entity's approval.
pub const APPROVAL_KEY: &str = "approval";
const APPROVAL_TYPE: &str = "entity.v1.ApprovalComponent";

/// Moves the pending approval of `id` to `state` (APPROVED or DENIED), recording who
/// decided (`decided_by`, empty without security) in the component so it replicates
/// with the decision. NotFound if the entity is not live; FailedPrecondition if it has
/// no PENDING approval.
pub fn decide(t: &mut Table, id: &str, state: ApprovalState, decided_by: &str) -> Result<WriteOutcome> {
    if !matches!(state, ApprovalState::Approved | ApprovalState::Denied) {
        return Err(Error::invalid(Some(id), None, format!("a decision is APPROVED or DENIED, got {}", state.as_str_name())));
    }
    let entity = Entity::decode(t.get(id)?.as_slice())
        .map_err(|e| Error::invalid(Some(id), None, format!("entity '{id}' does not decode: {e}")))?;
    let refuse = |why: String| Error::FailedPrecondition {
        id: id.into(),
        key: Some(APPROVAL_KEY.into()),
        msg: format!("no pending approval on entity '{id}' {why}"),
    };
    let Some(packed) = entity.components.get(APPROVAL_KEY) else { return Err(refuse("(approval: none)".into())) };
    if packed.type_url.rsplit('/').next() != Some(APPROVAL_TYPE) {
        return Err(refuse(format!("(component 'approval' holds {}, not {APPROVAL_TYPE})", packed.type_url)));
    }
    let approval = ApprovalComponent::decode(packed.value.as_slice())
        .map_err(|e| refuse(format!("(its approval component does not decode: {e})")))?;
    if approval.state() != ApprovalState::Pending {
        return Err(refuse(format!("(approval: {})", approval.state().as_str_name())));
    }
    let decision = ApprovalComponent { state: state as i32, decided_by: decided_by.into(), ..approval };
    let mut write = Entity { id: id.into(), ..Entity::default() };
    write.components.insert(
        APPROVAL_KEY.into(),
        prost_types::Any { type_url: packed.type_url.clone(), value: decision.encode_to_vec() },
    );
    if let Some(version) = entity.versions.get(APPROVAL_KEY) {
        write.versions.insert(APPROVAL_KEY.into(), version.clone());
    }
    t.write(&write.encode_to_vec(), WriteMode::Update, true)
}
