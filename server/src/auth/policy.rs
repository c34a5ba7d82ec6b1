//! Who may call what: the one table of RPC → role.

use std::fmt;

/// What a key may do. `admin` may call everything; the others only their
/// own methods, so a key leaked from an app that tracks events cannot read
/// metrics, and a dashboard's key cannot write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum AccessRole {
    /// Analytics queries, `Subscribe`, catalog reads.
    Reader,
    /// `Track` and `TrackStream`.
    Writer,
    /// Everything: catalog writes, `GetPipelineStatus`, and what readers and
    /// writers may call.
    Admin,
}

impl AccessRole {
    /// The role's name, as stored and shown.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Writer => "writer",
            Self::Admin => "admin",
        }
    }

    /// The role named `name`, as stored.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "reader" => Some(Self::Reader),
            "writer" => Some(Self::Writer),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// Whether this role may call a method that needs `needed`.
    pub(crate) fn allows(self, needed: Self) -> bool {
        self == Self::Admin || self == needed
    }
}

impl fmt::Display for AccessRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call to one gRPC path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Nothing: served to anyone (health, reflection, unless configured).
    Open,
    /// Any valid key (a method this table does not know: the router answers
    /// UNIMPLEMENTED to a caller who has proved who it is).
    AnyKey,
    /// A key whose role allows it.
    Role(AccessRole),
}

/// The services that are open unless `--auth-also` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OpenService {
    /// `grpc.health.v1.Health`, for load balancers and orchestrators.
    Health,
    /// gRPC server reflection (v1 and v1alpha), for grpcurl and tools.
    Reflection,
}

impl OpenService {
    fn of(service: &str) -> Option<Self> {
        match service {
            "grpc.health.v1.Health" => Some(Self::Health),
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
                Some(Self::Reflection)
            }
            _ => None,
        }
    }
}

/// The role each RTAP method needs, by service and method name.
const METHODS: &[(&str, &[(&str, AccessRole)])] = {
    use AccessRole::{Admin, Reader, Writer};
    &[
        (
            "rtap.v1.UserService",
            &[
                ("GetUser", Reader),
                ("ListUsers", Reader),
                ("CreateUser", Admin),
                ("UpdateUser", Admin),
                ("DeleteUser", Admin),
            ],
        ),
        (
            "rtap.v1.ProductService",
            &[
                ("GetProduct", Reader),
                ("ListProducts", Reader),
                ("CreateProduct", Admin),
                ("UpdateProduct", Admin),
                ("DeleteProduct", Admin),
            ],
        ),
        (
            "rtap.v1.AnalyticsService",
            &[
                ("GetEventCounts", Reader),
                ("GetUniqueUsers", Reader),
                ("GetEngagement", Reader),
                ("GetTopProducts", Reader),
                ("GetFunnel", Reader),
                ("Subscribe", Reader),
                ("GetPipelineStatus", Admin),
            ],
        ),
        (
            "rtap.v1.IngestService",
            &[("Track", Writer), ("TrackStream", Writer)],
        ),
    ]
};

/// What a call to `path` (`/package.Service/Method`) needs, given the open
/// services that `--auth-also` closed.
pub(crate) fn need(path: &str, closed: &[OpenService]) -> Need {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Need::AnyKey;
    };
    if let Some(open) = OpenService::of(service) {
        return if closed.contains(&open) {
            Need::AnyKey
        } else {
            Need::Open
        };
    }
    METHODS
        .iter()
        .find(|(name, _)| *name == service)
        .and_then(|(_, methods)| methods.iter().find(|(name, _)| *name == method))
        .map_or(Need::AnyKey, |(_, role)| Need::Role(*role))
}

/// Methods of the open services, for [`method_labels`].
const OPEN_METHODS: &[(&str, &[&str])] = &[
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
];

/// The service and method of `path` as metric labels: names of the
/// contract and of the open services, `other` for anything else (a client
/// can send any path; a label must not take any value).
pub(crate) fn method_labels(path: &str) -> (&'static str, &'static str) {
    const OTHER: (&str, &str) = ("other", "other");
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return OTHER;
    };
    let rtap = METHODS
        .iter()
        .find(|(name, _)| *name == service)
        .and_then(|(name, methods)| {
            let (method, _) = methods.iter().find(|(name, _)| *name == method)?;
            Some((*name, *method))
        });
    let open = || {
        OPEN_METHODS
            .iter()
            .find(|(name, _)| *name == service)
            .and_then(|(name, methods)| {
                Some((*name, *methods.iter().find(|name| **name == method)?))
            })
    };
    rtap.or_else(open).unwrap_or(OTHER)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Every method of every RTAP service in the contract has a role: a
    /// method added to a .proto cannot go out needing only "any key".
    #[test]
    fn every_rpc_of_the_contract_has_a_role() {
        let set = prost_types::FileDescriptorSet::decode(rtap::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut seen = 0;
        for file in &set.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    let path = format!("/{service_name}/{}", method.name());
                    assert!(
                        matches!(need(&path, &[]), Need::Role(_)),
                        "{path} has no role in auth::policy::METHODS"
                    );
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 19);
    }

    #[test]
    fn roles_allow_their_own_methods_and_admin_allows_all() {
        let role_of = |path| match need(path, &[]) {
            Need::Role(role) => role,
            other => panic!("{path}: {other:?}"),
        };
        assert_eq!(role_of("/rtap.v1.UserService/GetUser"), AccessRole::Reader);
        assert_eq!(role_of("/rtap.v1.IngestService/Track"), AccessRole::Writer);
        assert_eq!(
            role_of("/rtap.v1.AnalyticsService/GetPipelineStatus"),
            AccessRole::Admin
        );
        assert!(AccessRole::Admin.allows(AccessRole::Writer));
        assert!(!AccessRole::Reader.allows(AccessRole::Writer));
        assert!(!AccessRole::Writer.allows(AccessRole::Reader));
        assert!(!AccessRole::Reader.allows(AccessRole::Admin));
    }

    #[test]
    fn metric_labels_name_known_methods_only() {
        assert_eq!(
            method_labels("/rtap.v1.UserService/GetUser"),
            ("rtap.v1.UserService", "GetUser")
        );
        assert_eq!(
            method_labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            method_labels("/rtap.v1.UserService/Nope"),
            ("other", "other")
        );
        assert_eq!(method_labels("/made.up/Thing"), ("other", "other"));
        assert_eq!(method_labels("garbage"), ("other", "other"));
    }

    #[test]
    fn health_and_reflection_are_open_unless_closed() {
        let health = "/grpc.health.v1.Health/Check";
        let reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
        assert_eq!(need(health, &[]), Need::Open);
        assert_eq!(need(reflection, &[]), Need::Open);
        assert_eq!(need(health, &[OpenService::Health]), Need::AnyKey);
        assert_eq!(need(reflection, &[OpenService::Health]), Need::Open);
        assert_eq!(need("/rtap.v1.UserService/Nope", &[]), Need::AnyKey);
        assert_eq!(need("garbage", &[]), Need::AnyKey);
    }
}
