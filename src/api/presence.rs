//! `hexveil.v1.PresenceService`: ReportPresence, StreamPresence and SendFeedback.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::cells;
use crate::clock::SharedClock;
use crate::model::Feedback;
use crate::presence::{Decision, Presence, Report};
use crate::pseudonym::Pseudonymizer;
use crate::settings::LiveSettings;

use super::convert;
use super::pb::{self, presence_service_server::PresenceService};
use super::status::ApiError;
use super::validate::Violations;

/// Reports accepted from one stream before its replies must drain (back-pressure).
const STREAM_IN_FLIGHT: usize = 4096;
/// How far in the future `observed_at` may be (clock skew between phone and server).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The gRPC face of [`Presence`].
#[derive(Debug, Clone)]
pub struct PresenceApi {
    presence: Presence,
    pseudonyms: Pseudonymizer,
    settings: LiveSettings,
    clock: SharedClock,
    /// Open `StreamPresence` calls, at most `server.max_in_flight`: a stream's handler
    /// returns at once (its work runs on a task), so the per-call shed layer does not see
    /// it; each open stream holds one of these until it ends.
    streams: Arc<tokio::sync::Semaphore>,
}

impl PresenceApi {
    pub fn new(
        presence: Presence,
        pseudonyms: Pseudonymizer,
        settings: LiveSettings,
        clock: SharedClock,
    ) -> Self {
        let max_streams = settings.current().config.server.max_in_flight as usize;
        PresenceApi {
            presence,
            pseudonyms,
            settings,
            clock,
            streams: Arc::new(tokio::sync::Semaphore::new(max_streams)),
        }
    }

    /// Validates a report, naming every bad field.
    fn validate(&self, req: &pb::ReportPresenceRequest) -> Result<Report, ApiError> {
        let settings = self.settings.current();
        let loc = &settings.config.location;
        let mut v = Violations::default();
        v.device_token("device_token", &req.device_token);
        let cell = match cells::admit(req.cell, loc.max_resolution, loc.finer_cells) {
            Ok(c) => Some(c),
            Err(e) => {
                v.add("cell", e.to_string());
                None
            }
        };
        let now = self.clock.now();
        let observed_at = match &req.observed_at {
            None => {
                v.add("observed_at", "required");
                None
            }
            Some(ts) => match crate::clock::Timestamp::from_unix(ts.seconds, ts.nanos) {
                // The shared bound, narrowed: no phone reports from before 2000.
                Some(t) if t.seconds() >= 946_684_800 => Some(t),
                _ => {
                    v.add("observed_at", "must be a valid time after 2000-01-01");
                    None
                }
            }
            .and_then(|t| {
                if t > now.plus(MAX_CLOCK_SKEW) {
                    v.add("observed_at", "is in the future");
                    None
                } else {
                    Some(t)
                }
            }),
        };
        if !(-840..=840).contains(&req.utc_offset_minutes) {
            v.add("utc_offset_minutes", "must be between -840 and 840");
        }
        let (cell, observed_at) = v.finish_with(cell.zip(observed_at))?;
        Ok(Report {
            device: self.pseudonyms.device_id(&req.device_token),
            cell,
            observed_at,
            utc_offset_minutes: req.utc_offset_minutes,
        })
    }

    /// Decides one report now (in order) and returns the reply once it is durable.
    fn process(
        &self,
        req: pb::ReportPresenceRequest,
    ) -> impl std::future::Future<Output = pb::ReportPresenceReply> + Send + 'static {
        // A device this node does not hold may have consented at another node: its report is
        // decided after the store was asked (`Err(report)` here), the others at once, in order.
        let decided = match self.validate(&req) {
            Ok(r) if self.presence.needs_lookup(&r.device) => Err(r),
            v => Ok(v.and_then(|r| self.presence.decide(r).map_err(ApiError::from))),
        };
        let presence = self.presence.clone();
        async move {
            let decided = match decided {
                Ok(d) => d,
                Err(r) => match presence.look_up_if_unknown(r.device).await {
                    Ok(()) => presence.decide(r).map_err(ApiError::from),
                    Err(e) => Err(ApiError::from(e)),
                },
            };
            let result = match decided {
                Ok((decision, commit)) => presence
                    .commit(decision, commit)
                    .await
                    .map_err(ApiError::from),
                Err(e) => Err(e),
            };
            match result {
                Ok(d) => reply(&d),
                Err(e) => error_reply(e),
            }
        }
    }
}

fn reply(d: &Decision) -> pb::ReportPresenceReply {
    pb::ReportPresenceReply {
        offers: d
            .offers
            .iter()
            .map(|(o, why)| convert::delivered(o, why))
            .collect(),
        reason: convert::reason(d.reason) as i32,
        cell: d.cell,
        error: None,
    }
}

fn error_reply(e: ApiError) -> pb::ReportPresenceReply {
    let status = Status::from(e.clone());
    let (field, retry_after) = match &e {
        ApiError::InvalidArgument(v) => {
            (v.first().map(|(f, _)| f.clone()).unwrap_or_default(), None)
        }
        ApiError::RateLimited { retry_after } => {
            (String::new(), Some(convert::duration(*retry_after)))
        }
        _ => (String::new(), None),
    };
    pb::ReportPresenceReply {
        offers: Vec::new(),
        reason: pb::NoOfferReason::None as i32,
        cell: 0,
        error: Some(pb::ReportError {
            code: status.code() as i32,
            field,
            message: status.message().to_string(),
            retry_after,
        }),
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<pb::ReportPresenceReply, Status>> + Send>>;

#[tonic::async_trait]
impl PresenceService for PresenceApi {
    async fn report_presence(
        &self,
        request: Request<pb::ReportPresenceRequest>,
    ) -> Result<Response<pb::ReportPresenceReply>, Status> {
        let report = self.validate(request.get_ref())?;
        let decision = self.presence.report(report).await.map_err(ApiError::from)?;
        Ok(Response::new(reply(&decision)))
    }

    type StreamPresenceStream = ReplyStream;

    async fn stream_presence(
        &self,
        request: Request<Streaming<pb::ReportPresenceRequest>>,
    ) -> Result<Response<Self::StreamPresenceStream>, Status> {
        let Ok(slot) = self.streams.clone().try_acquire_owned() else {
            metrics::counter!("hexveil_grpc_shed_total").increment(1);
            return Err(Status::resource_exhausted(
                "too many open streams (server.max_in_flight); retry shortly",
            ));
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            // Held until the stream's work ends (client gone, or its last reply sent).
            let _slot = slot;
            // Reports are decided in arrival order as they are read; their replies are
            // released in the same order, each once its writes are durable. Many reports
            // are in flight at once, so one stream shares group commits with itself.
            let mut pending = FuturesOrdered::new();
            let mut open = true;
            while open || !pending.is_empty() {
                tokio::select! {
                    biased;
                    Some(reply) = pending.next(), if !pending.is_empty() => {
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                    msg = inbound.message(), if open && pending.len() < STREAM_IN_FLIGHT => match msg {
                        Ok(Some(req)) => pending.push_back(this.process(req)),
                        Ok(None) => open = false,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn send_feedback(
        &self,
        request: Request<pb::SendFeedbackRequest>,
    ) -> Result<Response<pb::SendFeedbackReply>, Status> {
        let req = request.into_inner();
        let mut v = Violations::default();
        v.device_token("device_token", &req.device_token);
        let offer_id = uuid::Uuid::try_parse(&req.offer_id);
        if offer_id.is_err() {
            v.add(
                "offer_id",
                "must be the UUID of an offer this device received",
            );
        }
        let action = match pb::FeedbackAction::try_from(req.action) {
            Ok(pb::FeedbackAction::Dismissed) => Some(Feedback::Dismissed),
            Ok(pb::FeedbackAction::Opened) => Some(Feedback::Opened),
            Ok(pb::FeedbackAction::MuteMerchant) => Some(Feedback::MuteMerchant),
            _ => {
                v.add("action", "must be DISMISSED, OPENED or MUTE_MERCHANT");
                None
            }
        };
        let (offer_id, action) = v.finish_with(offer_id.ok().zip(action))?;
        let device = self.pseudonyms.device_id(&req.device_token);
        self.presence
            .feedback(device, offer_id, action)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::SendFeedbackReply {}))
    }
}
