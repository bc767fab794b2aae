//! gRPC server reflection (grpc/grpc `doc/server-reflection.md`), v1 and its predecessor
//! v1alpha, answered from one index of the port's descriptors, so either version describes
//! every service the port lists (tonic-reflection's services each know only their own version).
//!
//! As the protocol says, a request that cannot be answered (an unknown symbol or file) gets an
//! `ErrorResponse` on the stream, which stays open for the client's next request; a file is sent
//! with those of its transitive dependencies not yet sent on the stream (as grpc-go does), so a
//! client needs no round trip per import.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use prost::Message;
use prost_reflect::{DescriptorError, DescriptorPool, FileDescriptor};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_reflection::pb::{v1, v1alpha};
use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

/// A descriptor set reflection cannot describe (a build defect: the sets are compiled in).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("a descriptor set does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("a descriptor set is invalid: {0}")]
    Invalid(#[from] DescriptorError),
}

/// What reflection knows: the services it lists and every descriptor it can describe.
#[derive(Debug)]
pub struct Index {
    services: Vec<String>,
    pool: DescriptorPool,
}

/// The standard services' descriptor sets as tonic ships them, and the name each file has in
/// grpc/grpc-proto (its import path, under which other servers describe it; tonic names them
/// `health.proto`, `reflection_v1.proto`, …).
const STANDARD_FILES: [(&[u8], &str); 3] = [
    (tonic_health::pb::FILE_DESCRIPTOR_SET, "grpc/health/v1/health.proto"),
    (v1::FILE_DESCRIPTOR_SET, "grpc/reflection/v1/reflection.proto"),
    (v1alpha::FILE_DESCRIPTOR_SET, "grpc/reflection/v1alpha/reflection.proto"),
];

impl Index {
    /// Lists `services`; describes the files of the encoded `descriptor_sets` (each with its
    /// imports), and those of health and both reflection versions.
    pub fn new(services: Vec<String>, descriptor_sets: &[&[u8]]) -> Result<Self, IndexError> {
        let mut pool = DescriptorPool::new();
        for (set, name) in STANDARD_FILES {
            // One file each, without imports or extension options: renaming loses nothing.
            let mut set = prost_types::FileDescriptorSet::decode(set)?;
            if let [file] = set.file.as_mut_slice() {
                file.name = Some(name.into());
            }
            pool.add_file_descriptor_set(set)?;
        }
        for set in descriptor_sets {
            pool.decode_file_descriptor_set(*set)?;
        }
        Ok(Index { services, pool })
    }

    /// The answer to one request of a stream that has already been sent the files in `sent`.
    fn answer(&self, request: v1::ServerReflectionRequest, sent: &mut HashSet<String>) -> v1::ServerReflectionResponse {
        let message = match &request.message_request {
            None => Err(Status::invalid_argument("the request names nothing to look up")),
            Some(MessageRequest::ListServices(_)) => {
                Ok(MessageResponse::ListServicesResponse(v1::ListServiceResponse {
                    service: self.services.iter().map(|name| v1::ServiceResponse { name: name.clone() }).collect(),
                }))
            }
            Some(MessageRequest::FileByFilename(name)) => self
                .pool
                .get_file_by_name(name)
                .ok_or_else(|| Status::not_found(format!("no file {name:?}")))
                .map(|file| self.files(file, sent)),
            Some(MessageRequest::FileContainingSymbol(symbol)) => self
                .file_declaring(symbol)
                .ok_or_else(|| Status::not_found(format!("no symbol {symbol:?}")))
                .map(|file| self.files(file, sent)),
            Some(MessageRequest::FileContainingExtension(wanted)) => self
                .pool
                .get_message_by_name(&wanted.containing_type)
                .and_then(|m| m.extensions().find(|e| i64::from(e.number()) == i64::from(wanted.extension_number)))
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "no extension {} of {:?}",
                        wanted.extension_number, wanted.containing_type
                    ))
                })
                .map(|extension| self.files(extension.parent_file(), sent)),
            Some(MessageRequest::AllExtensionNumbersOfType(name)) => self
                .pool
                .get_message_by_name(name)
                .ok_or_else(|| Status::not_found(format!("no message type {name:?}")))
                .map(|m| {
                    MessageResponse::AllExtensionNumbersResponse(v1::ExtensionNumberResponse {
                        base_type_name: m.full_name().to_string(),
                        extension_number: m.extensions().map(|e| e.number() as i32).collect(),
                    })
                }),
        };
        let message = message.unwrap_or_else(|status| {
            MessageResponse::ErrorResponse(v1::ErrorResponse {
                error_code: status.code() as i32,
                error_message: status.message().to_string(),
            })
        });
        v1::ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request),
            message_response: Some(message),
        }
    }

    /// The file that declares `symbol`: a service, method, message, field, enum, enum value
    /// (in the scope enclosing its enum, as protobuf scopes them) or extension.
    fn file_declaring(&self, symbol: &str) -> Option<FileDescriptor> {
        let pool = &self.pool;
        if let Some(s) = pool.get_service_by_name(symbol) {
            return Some(s.parent_file());
        }
        if let Some(m) = pool.get_message_by_name(symbol) {
            return Some(m.parent_file());
        }
        if let Some(e) = pool.get_enum_by_name(symbol) {
            return Some(e.parent_file());
        }
        if let Some(e) = pool.get_extension_by_name(symbol) {
            return Some(e.parent_file());
        }
        let (scope, name) = symbol.rsplit_once('.')?;
        if let Some(s) = pool.get_service_by_name(scope).filter(|s| s.methods().any(|m| m.name() == name)) {
            return Some(s.parent_file());
        }
        if let Some(m) = pool.get_message_by_name(scope).filter(|m| m.get_field_by_name(name).is_some()) {
            return Some(m.parent_file());
        }
        pool.all_enums()
            .find(|e| enclosing_scope(e.full_name()) == scope && e.get_value_by_name(name).is_some())
            .map(|e| e.parent_file())
    }

    /// `file`, then its transitive imports that `sent` does not hold; all are then in `sent`.
    fn files(&self, file: FileDescriptor, sent: &mut HashSet<String>) -> MessageResponse {
        let mut protos = vec![file.encode_to_vec()];
        sent.insert(file.name().to_string());
        let mut next = vec![file];
        while let Some(f) = next.pop() {
            for dependency in f.dependencies() {
                if sent.insert(dependency.name().to_string()) {
                    protos.push(dependency.encode_to_vec());
                    next.push(dependency);
                }
            }
        }
        MessageResponse::FileDescriptorResponse(v1::FileDescriptorResponse { file_descriptor_proto: protos })
    }
}

/// The scope a declaration named `full_name` sits in ("" at the top of no package).
fn enclosing_scope(full_name: &str) -> &str {
    full_name.rsplit_once('.').map_or("", |(scope, _)| scope)
}

type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers a stream of requests in order, one at a time (the client reads each answer before
/// the next is read: no buffer), until the client ends it. `decode`/`encode` translate
/// between a version's messages and v1's.
fn answers<Req, Resp>(
    index: Arc<Index>,
    requests: Streaming<Req>,
    decode: fn(Req) -> Result<v1::ServerReflectionRequest, Status>,
    encode: fn(v1::ServerReflectionResponse) -> Result<Resp, Status>,
) -> Answers<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    let stream = requests.scan(HashSet::new(), move |sent, request| {
        // A broken request stream (the client reset it) ends the answers.
        let answer = request.ok().map(|r| decode(r).and_then(|r| encode(index.answer(r, sent))));
        futures::future::ready(answer)
    });
    Box::pin(stream)
}

/// The v1 service.
#[derive(Debug, Clone)]
pub struct ReflectionV1(pub Arc<Index>);

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for ReflectionV1 {
    type ServerReflectionInfoStream = Answers<v1::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answers(self.0.clone(), request.into_inner(), Ok, Ok)))
    }
}

/// The v1alpha service: its messages are v1's on the wire (v1 renamed the package and changed
/// nothing else), so they are answered by v1's rule through their encoding.
#[derive(Debug, Clone)]
pub struct ReflectionV1alpha(pub Arc<Index>);

fn translate<From: Message, To: Message + Default>(message: From) -> Result<To, Status> {
    To::decode(message.encode_to_vec().as_slice()).map_err(|e| Status::new(Code::Internal, e.to_string()))
}

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for ReflectionV1alpha {
    type ServerReflectionInfoStream = Answers<v1alpha::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answers(self.0.clone(), request.into_inner(), translate, translate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> Index {
        Index::new(vec!["grpc.health.v1.Health".into()], &[]).unwrap()
    }

    fn ask(index: &Index, request: MessageRequest, sent: &mut HashSet<String>) -> MessageResponse {
        let request = v1::ServerReflectionRequest { host: "h".into(), message_request: Some(request) };
        let answer = index.answer(request.clone(), sent);
        assert_eq!(answer.original_request, Some(request));
        assert_eq!(answer.valid_host, "h");
        answer.message_response.unwrap()
    }

    fn file_names(answer: MessageResponse) -> Vec<String> {
        let MessageResponse::FileDescriptorResponse(files) = answer else { panic!("not files: {answer:?}") };
        files
            .file_descriptor_proto
            .iter()
            .map(|f| prost_types::FileDescriptorProto::decode(f.as_slice()).unwrap().name().to_string())
            .collect()
    }

    #[test]
    fn every_kind_of_symbol_is_found_in_its_file_and_either_version_is_described() {
        let index = index();
        let mut sent = HashSet::new();
        for symbol in [
            "grpc.health.v1.Health",
            "grpc.health.v1.Health.Watch",
            "grpc.health.v1.HealthCheckRequest",
            "grpc.health.v1.HealthCheckRequest.service",
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
            // An enum value sits in its enum's enclosing scope.
            "grpc.health.v1.HealthCheckResponse.SERVING",
        ] {
            let answer = ask(&index, MessageRequest::FileContainingSymbol(symbol.into()), &mut sent);
            assert_eq!(file_names(answer), ["grpc/health/v1/health.proto"], "{symbol}");
        }
        for version in ["v1", "v1alpha"] {
            let service = format!("grpc.reflection.{version}.ServerReflection");
            let answer = ask(&index, MessageRequest::FileContainingSymbol(service), &mut sent);
            assert_eq!(file_names(answer), [format!("grpc/reflection/{version}/reflection.proto")]);
        }
    }

    #[test]
    fn an_unknown_symbol_is_an_error_on_the_stream_not_its_end() {
        let index = index();
        let mut sent = HashSet::new();
        for request in [
            MessageRequest::FileContainingSymbol("no.Such".into()),
            MessageRequest::FileByFilename("no/such.proto".into()),
            MessageRequest::AllExtensionNumbersOfType("no.Such".into()),
            MessageRequest::FileContainingExtension(v1::ExtensionRequest {
                containing_type: "grpc.health.v1.HealthCheckRequest".into(),
                extension_number: 100,
            }),
        ] {
            match ask(&index, request.clone(), &mut sent) {
                MessageResponse::ErrorResponse(e) => assert_eq!(e.error_code, Code::NotFound as i32, "{request:?}"),
                other => panic!("{request:?}: {other:?}"),
            }
        }
        let listed = ask(&index, MessageRequest::ListServices(String::new()), &mut sent);
        assert_eq!(
            listed,
            MessageResponse::ListServicesResponse(v1::ListServiceResponse {
                service: vec![v1::ServiceResponse { name: "grpc.health.v1.Health".into() }]
            })
        );
        let known = ask(
            &index,
            MessageRequest::AllExtensionNumbersOfType("grpc.health.v1.HealthCheckRequest".into()),
            &mut sent,
        );
        assert!(matches!(known, MessageResponse::AllExtensionNumbersResponse(r) if r.extension_number.is_empty()));
    }

    #[test]
    fn a_file_comes_with_the_imports_the_stream_has_not_had() {
        // A file importing another, as Tidal's protos import each other.
        let file = |name: &str, deps: &[&str], message: &str| prost_types::FileDescriptorProto {
            name: Some(name.into()),
            package: Some("t".into()),
            dependency: deps.iter().map(|d| d.to_string()).collect(),
            message_type: vec![prost_types::DescriptorProto { name: Some(message.into()), ..Default::default() }],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        let set = prost_types::FileDescriptorSet {
            file: vec![file("t/base.proto", &[], "Base"), file("t/top.proto", &["t/base.proto"], "Top")],
        }
        .encode_to_vec();
        let index = Index::new(vec![], &[&set]).unwrap();
        let mut sent = HashSet::new();
        let top = ask(&index, MessageRequest::FileContainingSymbol("t.Top".into()), &mut sent);
        assert_eq!(file_names(top), ["t/top.proto", "t/base.proto"]);
        let again = ask(&index, MessageRequest::FileByFilename("t/top.proto".into()), &mut sent);
        assert_eq!(file_names(again), ["t/top.proto"], "the import was sent on this stream already");
        let fresh = ask(&index, MessageRequest::FileByFilename("t/top.proto".into()), &mut HashSet::new());
        assert_eq!(file_names(fresh), ["t/top.proto", "t/base.proto"]);
    }
}
