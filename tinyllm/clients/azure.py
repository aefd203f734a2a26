"""The Azure OpenAI client: endpoint, API version, key or Entra ID, model-to-deployment map."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import ConfigError
from ._base import Capabilities
from .openai import OpenAIClient
from ..http._transport import http_client

__all__ = ["AzureClient"]


class AzureClient(OpenAIClient):
    """Azure OpenAI through the SDK's ``AzureOpenAI`` / ``AsyncAzureOpenAI``.

    Settings: ``AZURE_OPENAI_ENDPOINT`` (required), ``AZURE_OPENAI_KEY`` or
    ``AZURE_OPENAI_API_KEY``, else Entra ID through the optional
    ``azure-identity`` package (``DefaultAzureCredential``); API version from
    ``AZURE_API_VERSION`` (config) or ``AZURE_OPENAI_VERSION`` (environment).
    A model name is sent as the deployment given for it in ``AZURE_DEPLOYMENTS``,
    else ``AZURE_OPENAI_DEPLOYMENT``, else the model name itself; embeddings use
    ``AZURE_OPENAI_EMBEDDINGS_DEPLOYMENT`` or the map.

    Args:
        endpoint: ``https://NAME.openai.azure.com`` (default: ``AZURE_OPENAI_ENDPOINT``).
        api_key: the key (default: ``AZURE_OPENAI_KEY`` / ``AZURE_OPENAI_API_KEY``).
        api_version: default ``AZURE_API_VERSION``.
        deployments: ``{model name: deployment name}`` (default ``AZURE_DEPLOYMENTS``).
        cache, **settings: as for :class:`~tinyllm.Client`.

    Raises:
        ConfigError: an unknown setting or a bad value; on use, when the endpoint
            is unset, or when there is no key and azure-identity is not installed.
    """

    api_type = "azure"
    api_key_secret = "AZURE_OPENAI_KEY"
    # structured output needs API version 2024-08-01-preview or later (AZURE_API_VERSION)
    capabilities = Capabilities(
        json_schema=True,
        json_grammar=False,
        grammar=False,
        tools=True,
        streaming=True,
        embeddings=True,
        images=True,
        audio=True,
        files=True,
    )

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        api_key: str | None = None,
        api_version: str | None = None,
        deployments: dict[str, str] | None = None,
        cache: Any = None,
        **settings: Any,
    ) -> None:
        super().__init__(
            api_key=api_key, cache=cache, azure_api_version=api_version, azure_deployments=deployments, **settings
        )
        if endpoint is not None:
            if not isinstance(endpoint, str) or not endpoint:
                raise ConfigError("endpoint must be a non-empty str such as https://NAME.openai.azure.com")
            self._secrets["AZURE_OPENAI_ENDPOINT"] = endpoint

    def base_url(self, cfg: Config) -> str | None:
        return cfg.secret("AZURE_OPENAI_ENDPOINT")

    def api_version(self, cfg: Config) -> str:
        """``AZURE_API_VERSION`` as given; else ``AZURE_OPENAI_VERSION`` from the environment; else the default."""
        if cfg.source("AZURE_API_VERSION") == "default" and cfg.secret("AZURE_OPENAI_VERSION"):
            return cfg.secret("AZURE_OPENAI_VERSION")  # type: ignore[return-value]
        return cfg.azure_api_version

    def deployment(self, cfg: Config, model: str) -> str:
        """The deployment name for ``model``."""
        return cfg.azure_deployments.get(model) or cfg.secret("AZURE_OPENAI_DEPLOYMENT") or model

    def embedding_target(self, cfg: Config, model: str) -> str:
        return cfg.azure_deployments.get(model) or cfg.secret("AZURE_OPENAI_EMBEDDINGS_DEPLOYMENT") or model

    def endpoint(self, cfg: Config, model: str) -> dict:
        return {"api_type": "azure", "endpoint": self.where(cfg), "deployment": self.deployment(cfg, model)}

    def embedding_endpoint(self, cfg: Config, model: str) -> dict:
        return {"api_type": "azure", "endpoint": self.where(cfg), "deployment": self.embedding_target(cfg, model)}

    def where(self, cfg: Config) -> str:
        endpoint = self.base_url(cfg)
        if not endpoint:
            raise ConfigError(
                "api_type 'azure' needs AZURE_OPENAI_ENDPOINT (environment or .env), e.g. https://NAME.openai.azure.com"
            )
        return endpoint

    def _api_key(self, cfg: Config) -> str:
        return cfg.secret("AZURE_OPENAI_KEY", "AZURE_OPENAI_API_KEY") or ""

    def _sdk_key(self, cfg: Config) -> tuple:
        return (self.where(cfg), self._api_key(cfg), self.api_version(cfg))

    def _make_sdk(self, cfg: Config, is_async: bool) -> Any:
        import openai

        cls = openai.AsyncAzureOpenAI if is_async else openai.AzureOpenAI
        auth: dict[str, Any] = {"api_key": self._api_key(cfg)}
        if not auth["api_key"]:
            try:
                from azure.identity import DefaultAzureCredential, get_bearer_token_provider
            except ImportError as exc:
                raise ConfigError(
                    "api_type 'azure' needs AZURE_OPENAI_KEY (or AZURE_OPENAI_API_KEY), "
                    "or Entra ID: pip install azure-identity and sign in (az login)"
                ) from exc
            auth = {
                "azure_ad_token_provider": get_bearer_token_provider(
                    DefaultAzureCredential(), "https://cognitiveservices.azure.com/.default"
                )
            }
        return cls(
            azure_endpoint=self.where(cfg),
            api_version=self.api_version(cfg),
            max_retries=0,
            timeout=cfg.timeout,
            http_client=http_client(is_async),
            **auth,
        )

    def _request_args(self, messages: list[dict], params: dict, cfg: Config) -> dict:
        args = super()._request_args(messages, params, cfg)
        args["body"]["model"] = self.deployment(
            cfg, params["model"]
        )  # the SDK routes by it; extra_body cannot change it
        return args
