"""Authentication (client certificates, bearer tokens: static, bootstrap, service account)
and a small authorizer with the rules the agent's identities need."""

from __future__ import annotations

import base64
import datetime as dt
import hmac
from dataclasses import dataclass

from .api import UserInfo
from .store import Store
from .tokens import BOOTSTRAP_SECRET_PREFIX, BOOTSTRAP_SECRET_TYPE, BOOTSTRAP_TOKEN, ServiceAccountSigner

ANONYMOUS = UserInfo("system:anonymous", ("system:unauthenticated",))


class Unauthorized(Exception):
    pass


def _secret_field(secret: dict, key: str) -> str:
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        return ""
    try:
        return base64.b64decode(raw).decode()
    except (ValueError, UnicodeDecodeError):
        return ""


@dataclass
class Authenticator:
    store: Store
    static_tokens: dict[str, UserInfo]
    sa_signer: ServiceAccountSigner

    def from_certificate(self, peercert: dict | None) -> UserInfo | None:
        if not peercert:
            return None
        cn, orgs = "", []
        for rdn in peercert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
                elif key == "organizationName":
                    orgs.append(value)
        if not cn:
            return None
        return UserInfo(cn, tuple(orgs) + ("system:authenticated",))

    def from_token(self, token: str) -> UserInfo:
        """The user of a bearer token; raises Unauthorized for a bad token."""
        user = self.static_tokens.get(token)
        if user is not None:
            return user
        m = BOOTSTRAP_TOKEN.match(token)
        if m:
            return self._bootstrap_user(m.group(1), m.group(2))
        claims = self.sa_signer.verify(token)
        if claims is not None:
            sub = claims.get("sub", "")
            if sub.startswith("system:serviceaccount:"):
                ns = sub.split(":")[2]
                private = claims.get("kubernetes.io") or {}
                pod = private.get("pod")
                if pod:
                    current = self.store.get("/pods", ns, pod.get("name", ""))
                    if current is None or current["metadata"]["uid"] != pod.get("uid"):
                        raise Unauthorized("the pod this token is bound to no longer exists")
                return UserInfo(sub, ("system:serviceaccounts", f"system:serviceaccounts:{ns}",
                                      "system:authenticated"))
        raise Unauthorized("invalid bearer token")

    def _bootstrap_user(self, token_id: str, token_secret: str) -> UserInfo:
        secret = self.store.get("/secrets", "kube-system", BOOTSTRAP_SECRET_PREFIX + token_id)
        if secret is None or secret.get("type") != BOOTSTRAP_SECRET_TYPE:
            raise Unauthorized("no such bootstrap token")
        if not hmac.compare_digest(_secret_field(secret, "token-secret"), token_secret):
            raise Unauthorized("bootstrap token secret mismatch")
        if _secret_field(secret, "usage-bootstrap-authentication") != "true":
            raise Unauthorized("bootstrap token not usable for authentication")
        expiration = _secret_field(secret, "expiration")
        if expiration:
            when = dt.datetime.fromisoformat(expiration.replace("Z", "+00:00"))
            if when < dt.datetime.now(dt.timezone.utc):
                raise Unauthorized("bootstrap token expired")
        groups = ["system:bootstrappers"]
        extra = _secret_field(secret, "auth-extra-groups")
        groups += [g.strip() for g in extra.split(",") if g.strip()]
        return UserInfo(f"system:bootstrap:{token_id}", tuple(groups) + ("system:authenticated",))


PUBLIC_PATHS = ("/version", "/healthz", "/livez", "/readyz")

_NODE_RULES: dict[str, set[str]] = {
    "nodes": {"get", "list", "watch", "create", "update", "patch", "delete"},
    "nodes/status": {"get", "update", "patch"},
    "pods": {"get", "list", "watch", "create", "delete"},
    "pods/status": {"get", "update", "patch"},
    "pods/eviction": {"create"},
    "leases": {"get", "list", "watch", "create", "update", "patch", "delete"},
    "events": {"create", "update", "patch"},
    "configmaps": {"get", "list", "watch"},
    "secrets": {"get", "list", "watch"},
    "services": {"get", "list", "watch"},
    "endpoints": {"get", "list", "watch"},
    "endpointslices": {"get", "list", "watch"},
    "serviceaccounts": {"get"},
    "serviceaccounts/token": {"create"},
    "certificatesigningrequests": {"create", "get", "list", "watch"},
    "namespaces": {"get"},
    "tokenreviews": {"create"},
    "subjectaccessreviews": {"create"},
}

_BOOTSTRAP_RULES: dict[str, set[str]] = {
    "certificatesigningrequests": {"create", "get", "list", "watch"},
}


def authorize(user: UserInfo, verb: str, plural: str | None, subresource: str | None,
              namespace: str | None, name: str | None, path: str,
              grants: dict[str, dict[str, set[str]]] | None = None) -> bool:
    """`grants`: extra rules a test bound to a user or group (like a ClusterRoleBinding):
    subject -> {"plural[/subresource]": verbs}."""
    if user.is_admin:
        return True
    if grants and plural is not None:
        resource = plural + (f"/{subresource}" if subresource else "")
        for subject in (user.name, *user.groups):
            verbs = grants.get(subject, {}).get(resource, set())
            if verb in verbs or "*" in verbs:
                return True
    if plural is None:  # non-resource URL
        if path in PUBLIC_PATHS or path.startswith(("/healthz/", "/livez/", "/readyz/")):
            return True
        return "system:authenticated" in user.groups and verb == "get"
    # kubeadm's RBAC lets everyone read cluster-info for token discovery.
    if plural == "configmaps" and namespace == "kube-public" and name == "cluster-info" and verb == "get":
        return True
    if plural in ("selfsubjectaccessreviews", "selfsubjectreviews") and verb == "create":
        return "system:authenticated" in user.groups
    resource = plural + (f"/{subresource}" if subresource else "")
    if "system:nodes" in user.groups and user.name.startswith("system:node:"):
        return verb in _NODE_RULES.get(resource, set())
    if "system:bootstrappers" in user.groups:
        return verb in _BOOTSTRAP_RULES.get(resource, set())
    return False
