//! The gRPC edge of the catalog: each resource's tonic service, whose
//! methods only unwrap a request for [`ResourceApi`](super::resource::ResourceApi)
//! and wrap its reply.
//!
//! A macro, because tonic's generated traits name every method and message
//! concretely, while the messages follow AIP-131..135 alike (`id`,
//! `page_size`, `order_by`, `page_token`, `update_mask`, and the resource in
//! a field named after it): only the names differ between resources.

/// Implements a catalog service, and `into_server`, for a `ResourceApi`.
macro_rules! resource_service {
    (
        impl $service:ident for $api:ty as $server:ident {
            resource: $one:ident, list: $many:ident,
            $get:ident($get_request:ident) -> $get_response:ident,
            $list:ident($list_request:ident) -> $list_response:ident,
            $create:ident($create_request:ident) -> $create_response:ident,
            $update:ident($update_request:ident) -> $update_response:ident,
            $delete:ident($delete_request:ident) -> $delete_response:ident $(,)?
        }
    ) => {
        impl $api {
            /// The service, ready to add to a tonic router.
            pub(crate) fn into_server(self) -> $server<$api> {
                $server::new(self)
            }
        }

        #[tonic::async_trait]
        impl $service for $api {
            async fn $get(
                &self,
                request: tonic::Request<$get_request>,
            ) -> Result<tonic::Response<$get_response>, tonic::Status> {
                let $one = self.get(request.into_inner().id).await?;
                Ok(tonic::Response::new($get_response { $one: Some($one) }))
            }

            async fn $list(
                &self,
                request: tonic::Request<$list_request>,
            ) -> Result<tonic::Response<$list_response>, tonic::Status> {
                let request = request.into_inner();
                let paging = $crate::catalog::resource::Paging {
                    size: request.page_size,
                    order_by: &request.order_by,
                    token: &request.page_token,
                };
                let ($many, next_page_token) = self.list(&request, paging).await?;
                Ok(tonic::Response::new($list_response {
                    $many,
                    next_page_token,
                }))
            }

            async fn $create(
                &self,
                request: tonic::Request<$create_request>,
            ) -> Result<tonic::Response<$create_response>, tonic::Status> {
                let $one = self.create(request.into_inner().$one).await?;
                Ok(tonic::Response::new($create_response { $one: Some($one) }))
            }

            async fn $update(
                &self,
                request: tonic::Request<$update_request>,
            ) -> Result<tonic::Response<$update_response>, tonic::Status> {
                let request = request.into_inner();
                let message = request.$one.map(|message| (message.id, message));
                let $one = self.update(message, request.update_mask).await?;
                Ok(tonic::Response::new($update_response { $one: Some($one) }))
            }

            async fn $delete(
                &self,
                request: tonic::Request<$delete_request>,
            ) -> Result<tonic::Response<$delete_response>, tonic::Status> {
                self.delete(request.into_inner().id).await?;
                Ok(tonic::Response::new($delete_response {}))
            }
        }
    };
}
pub(crate) use resource_service;
