//! The baseline: an empty `hexveil.v1.PresenceService` on a real tonic server — it decodes
//! each request and answers an empty reply — so a run can compare hexveil with what the
//! transport alone allows, on the same machine, under the same load.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use hexveil::api::pb;
use hexveil::api::pb::presence_service_server::{PresenceService, PresenceServiceServer};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Default, Clone, Copy)]
struct Empty;

type Replies = Pin<Box<dyn Stream<Item = Result<pb::ReportPresenceReply, Status>> + Send>>;

#[tonic::async_trait]
impl PresenceService for Empty {
    async fn report_presence(
        &self,
        _request: Request<pb::ReportPresenceRequest>,
    ) -> Result<Response<pb::ReportPresenceReply>, Status> {
        Ok(Response::new(pb::ReportPresenceReply::default()))
    }

    type StreamPresenceStream = Replies;

    async fn stream_presence(
        &self,
        request: Request<Streaming<pb::ReportPresenceRequest>>,
    ) -> Result<Response<Self::StreamPresenceStream>, Status> {
        let replies = request
            .into_inner()
            .map(|r| r.map(|_| pb::ReportPresenceReply::default()));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn send_feedback(
        &self,
        _request: Request<pb::SendFeedbackRequest>,
    ) -> Result<Response<pb::SendFeedbackReply>, Status> {
        Ok(Response::new(pb::SendFeedbackReply {}))
    }
}

/// Serves the empty handler on `listen` until killed; prints `baseline listening addr=ADDR`.
pub async fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("baseline listening addr={}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(PresenceServiceServer::new(Empty))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
