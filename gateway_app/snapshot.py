"""Everything a reload may change, as one immutable object: the routes and their settings, the API keys,
the engine credential. A reload builds a new snapshot and swaps it whole; a request uses the snapshot it
started with to its end."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway_app.auth import ANONYMOUS, Client, KeyStore
from gateway_app.config import Settings
from gateway_app.rate_limit import Limits
from gateway_app.route_table import RouteTable


@dataclass(frozen=True, slots=True)
class Snapshot:
    routes: RouteTable
    keys: KeyStore | None  # None: authentication is off
    engine_auth: tuple[tuple[str, str], ...]  # headers for every engine request
    settings: Settings = field(init=False)  # the routes' settings, at hand
    default_limits: Limits = field(init=False)  # for a client without limits of its own

    def __post_init__(self) -> None:
        settings = self.routes.settings
        object.__setattr__(self, "settings", settings)
        limits = settings.limits
        object.__setattr__(self, "default_limits", Limits(limits.requests_per_minute, limits.tokens_per_minute))

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Client:
        keys = self.keys
        return ANONYMOUS if keys is None else keys.authenticate(headers)

    def limits_for(self, client: Client) -> Limits:
        """The client's own limits, else the map-wide defaults."""
        if client.requests_per_minute is None and client.tokens_per_minute is None:
            return self.default_limits
        defaults = self.default_limits
        return Limits(
            client.requests_per_minute if client.requests_per_minute is not None else defaults.requests_per_minute,
            client.tokens_per_minute if client.tokens_per_minute is not None else defaults.tokens_per_minute,
        )
