//! `hexveil.v1.TransparencyService`: GetMyData, ForgetMe and GetPrivacyPolicy.

use tonic::{Request, Response, Status};

use crate::consent::Consents;
use crate::policy::PrivacyPolicy;
use crate::pseudonym::Pseudonymizer;
use crate::settings::LiveSettings;

use super::convert;
use super::pb::{self, transparency_service_server::TransparencyService};
use super::validate::Violations;

/// The gRPC face of transparency: what is held, erasure, and the policy in force.
#[derive(Debug, Clone)]
pub struct TransparencyApi {
    consents: Consents,
    pseudonyms: Pseudonymizer,
    settings: LiveSettings,
}

impl TransparencyApi {
    pub fn new(consents: Consents, pseudonyms: Pseudonymizer, settings: LiveSettings) -> Self {
        TransparencyApi {
            consents,
            pseudonyms,
            settings,
        }
    }
}

#[tonic::async_trait]
impl TransparencyService for TransparencyApi {
    async fn get_my_data(
        &self,
        request: Request<pb::GetMyDataRequest>,
    ) -> Result<Response<pb::MyData>, Status> {
        let req = request.into_inner();
        let mut v = Violations::default();
        v.device_token("device_token", &req.device_token);
        v.finish()?;
        let device = self.pseudonyms.device_id(&req.device_token);
        let data = self
            .consents
            .my_data(device)
            .await
            .map_err(super::ApiError::from)?;
        Ok(Response::new(convert::my_data(&data)))
    }

    async fn forget_me(
        &self,
        request: Request<pb::ForgetMeRequest>,
    ) -> Result<Response<pb::ForgetMeReply>, Status> {
        let req = request.into_inner();
        let mut v = Violations::default();
        v.device_token("device_token", &req.device_token);
        v.finish()?;
        let device = self.pseudonyms.device_id(&req.device_token);
        let erased = self
            .consents
            .forget(device)
            .await
            .map_err(super::ApiError::from)?;
        Ok(Response::new(pb::ForgetMeReply {
            records_erased: erased,
        }))
    }

    async fn get_privacy_policy(
        &self,
        _request: Request<pb::GetPrivacyPolicyRequest>,
    ) -> Result<Response<pb::PrivacyPolicy>, Status> {
        let settings = self.settings.current();
        let policy = PrivacyPolicy::of(&settings);
        Ok(Response::new(convert::privacy_policy(&policy)))
    }
}
