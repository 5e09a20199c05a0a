//! The one map from errors to gRPC statuses, with rich details (tonic-types): BadRequest
//! naming each field, RetryInfo on rate limits. Internal details are logged, never sent.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use super::validate::{VIOLATIONS_LISTED, more_violations};
use crate::consent::ConsentError;
use crate::store::StoreError;

/// Every way an API call can fail, as the client should see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// One or more fields are invalid: (field, description) pairs.
    #[error("invalid argument: {0:?}")]
    InvalidArgument(Vec<(String, String)>),
    #[error("not found: {0}")]
    NotFound(&'static str),
    #[error("unauthenticated")]
    Unauthenticated,
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    /// A single-field validation error.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        ApiError::InvalidArgument(vec![(field.into(), description.into())])
    }
}

impl From<crate::presence::PresenceError> for ApiError {
    fn from(e: crate::presence::PresenceError) -> Self {
        use crate::presence::PresenceError as P;
        match e {
            P::RateLimited { retry_after } => ApiError::RateLimited { retry_after },
            P::UnknownOffer => ApiError::NotFound("no notification of this offer to this device"),
            P::Store(s) => ApiError::Store(s),
        }
    }
}

impl From<crate::offers::OfferError> for ApiError {
    fn from(e: crate::offers::OfferError) -> Self {
        use crate::offers::OfferError as O;
        match e {
            O::Invalid(v) => ApiError::InvalidArgument(v),
            O::NotFound => ApiError::NotFound("no such offer of this merchant"),
            O::Store(s) => ApiError::Store(s),
        }
    }
}

impl From<crate::merchants::MerchantError> for ApiError {
    fn from(e: crate::merchants::MerchantError) -> Self {
        use crate::merchants::MerchantError as M;
        match e {
            M::Unauthenticated => ApiError::Unauthenticated,
            M::Invalid { field, message } => ApiError::field(field, message),
            M::NotFound => ApiError::NotFound("no such merchant"),
            M::Store(s) => ApiError::Store(s),
        }
    }
}

impl From<crate::privacy::query::QueryError> for ApiError {
    fn from(e: crate::privacy::query::QueryError) -> Self {
        use crate::privacy::query::QueryError as Q;
        match e {
            Q::Invalid { field, message } => ApiError::field(field, message),
            Q::OutsideArea(cell) => ApiError::PermissionDenied(format!(
                "cell {cell:x} is outside your area (insights.scope = \"own_area\")"
            )),
            Q::Store(s) => ApiError::Store(s),
        }
    }
}

impl From<ConsentError> for ApiError {
    fn from(e: ConsentError) -> Self {
        match e {
            ConsentError::NotFound => ApiError::NotFound("no consent on record for this device"),
            ConsentError::Store(s) => ApiError::Store(s),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::InvalidArgument(mut violations) => {
                // Every path is capped here too (domain validators build their own lists),
                // so no error grows with the request.
                if violations.len() > VIOLATIONS_LISTED + 1 {
                    let more = violations.len() - VIOLATIONS_LISTED;
                    violations.truncate(VIOLATIONS_LISTED);
                    violations.push(more_violations(more));
                }
                let message = violations
                    .iter()
                    .map(|(f, d)| format!("{f}: {d}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|(f, d)| FieldViolation::new(f, d))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::NotFound(what) => Status::not_found(what),
            ApiError::Unauthenticated => {
                Status::unauthenticated("missing or invalid API key (authorization: Bearer <key>)")
            }
            ApiError::PermissionDenied(why) => Status::permission_denied(why),
            ApiError::RateLimited { retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                format!("rate limited; retry after {} ms", retry_after.as_millis()),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            ApiError::Store(err) => {
                metrics::counter!("hexveil_store_errors_total", "kind" => err.error_code())
                    .increment(1);
                match err {
                    StoreError::Unavailable(detail) => {
                        tracing::warn!(%detail, "store unavailable");
                        Status::unavailable("the store is unavailable; nothing was changed")
                    }
                    StoreError::Config(detail)
                    | StoreError::Corrupt(detail)
                    | StoreError::Rejected(detail) => {
                        tracing::error!(%detail, "internal store error");
                        Status::internal("internal error")
                    }
                }
            }
        }
    }
}
