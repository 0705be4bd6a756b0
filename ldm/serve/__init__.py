"""The image service (`ldm-serve`): an HTTP API over one loaded model, with a persistent job queue.

What belongs here: the server's settings and command line (`settings`, `main`), the SQLite job store
(`store`), the one worker thread that owns the model (`worker`, `engine`), the request models and their
limits (`schemas`), the LoRAs and embeddings requests may name (`adapters`), auth and request limits
(`security`), metrics (`metrics`), one router per API family (`api_native`, `api_a1111`, `api_openai`, `api_ops`)
and the web page (`api_web`, files in `web/`), put together by `app.create_app`; `ray_serve` deploys that app on
Ray Serve (optional: only it imports Ray). The picture-making is `ldm.generation`'s and the PNG writing
`ldm.files`'s, so the service's images are the CLI's.
"""
