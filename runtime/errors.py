"""Errors that travel back to whoever asked an actor something.

Each carries what the HTTP layer needs to answer in OpenAI's error shape: an HTTP status,
an OpenAI error ``type``, an optional ``param`` and ``code``, and whether a retry can help.
"""
from __future__ import annotations


class ServiceError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    retryable = True

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """What its HTTP answer says besides the body: whether (and when) to retry."""
        headers = {}
        if not self.retryable:
            headers["x-should-retry"] = "false"
        if self.status == 503:              # busy (Overloaded), or a model going away
            headers["Retry-After"] = "1"
        return headers


class InvalidRequest(ServiceError):
    """The client sent something we cannot serve; retrying the same body will not help."""
    status = 400
    type = "invalid_request_error"
    retryable = False


class ModelNotFound(InvalidRequest):
    status = 404
    code = "model_not_found"


class Unauthorized(ServiceError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    retryable = False


class Overloaded(ServiceError):
    """Too much queued work: the client may retry later."""
    status = 503
    type = "server_error"
    code = "overloaded"


class DeadlineExceeded(ServiceError):
    """A bounded wait ran out. The message says what was waited for."""
    status = 504
    type = "server_error"
    code = "timeout"


class ActorCrashed(ServiceError):
    status = 500
    code = "actor_crashed"


class ActorStopped(ServiceError):
    status = 503
    code = "actor_stopped"


class ModelFailed(ServiceError):
    """The model itself raised while loading or computing."""
    status = 500
    code = "model_error"
    retryable = False
