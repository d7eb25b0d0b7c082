"""The HTTP server's machinery below its routes: the bounded, fair worker (`request_queue.py`), the ASGI front door
(`guard.py`: Host names, tokens, origins, scopes, security headers) and its rules beside bearer tokens, the network
binding rule and TLS files (`auth.py`), header and body time limits (`connection.py`), `/openapi.json` true to the
routes (`api_contract.py`), the field views (`views.py`), what the routes share (`service.py`: `Limits`, the
metrics) and the slide jobs (`slide_jobs.py`). The routes and the command are `runtime/apps/routes.py` and
`runtime/apps/serve.py`; the Triton server reuses `auth.py`."""
