"""One router per resource; /v1 routers come from ``services.api.auth.v1_router``."""
