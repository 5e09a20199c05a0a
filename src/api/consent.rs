//! `hexveil.v1.ConsentService`: SetConsent and GetConsent.

use tonic::{Request, Response, Status};

use crate::consent::Consents;
use crate::pseudonym::Pseudonymizer;

use super::convert;
use super::pb::{self, consent_service_server::ConsentService};
use super::validate::Violations;

/// The gRPC face of [`Consents`].
#[derive(Debug, Clone)]
pub struct ConsentApi {
    consents: Consents,
    pseudonyms: Pseudonymizer,
}

impl ConsentApi {
    pub fn new(consents: Consents, pseudonyms: Pseudonymizer) -> Self {
        ConsentApi {
            consents,
            pseudonyms,
        }
    }
}

#[tonic::async_trait]
impl ConsentService for ConsentApi {
    async fn set_consent(
        &self,
        request: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::ConsentReceipt>, Status> {
        let req = request.into_inner();
        let mut v = Violations::default();
        v.device_token("device_token", &req.device_token);
        let purposes = v.purposes("purposes", &req.purposes);
        v.policy_version("policy_version", &req.policy_version);
        v.finish()?;
        let device = self.pseudonyms.device_id(&req.device_token);
        let view = self
            .consents
            .set(device, purposes, req.policy_version)
            .await
            .map_err(super::ApiError::from)?;
        Ok(Response::new(convert::receipt(&view)))
    }

    async fn get_consent(
        &self,
        request: Request<pb::GetConsentRequest>,
    ) -> Result<Response<pb::ConsentReceipt>, Status> {
        let req = request.into_inner();
        let mut v = Violations::default();
        v.device_token("device_token", &req.device_token);
        v.finish()?;
        let device = self.pseudonyms.device_id(&req.device_token);
        let view = self
            .consents
            .get(device)
            .await
            .map_err(super::ApiError::from)?;
        Ok(Response::new(convert::receipt(&view)))
    }
}
