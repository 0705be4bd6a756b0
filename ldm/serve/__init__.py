"""The image service (`ldm-serve`): an HTTP API over one loaded model, with a persistent job queue.

What belongs here: the server's settings and command line (`settings`, `main`), the SQLite job store
(`store`), the one worker thread that owns the model (`worker`, `engine`), the request models and their
limits (`schemas`), auth and request limits (`security`), metrics (`metrics`), and one router per API
family (`api_native`, `api_a1111`, `api_openai`, `api_ops`), put together by `app.create_app`. The picture-making
is `ldm.generation`'s and the PNG writing `ldm.files`'s, so the service's images are the CLI's.
"""
