"""`minidiff serve`: a web page to generate and look inside, and AUTOMATIC1111's /sdapi/v1 API, on one job queue.

    a1111.py     what AUTOMATIC1111's API defines: sampler names, request fields and defaults, answer shapes
    registry.py  the models the server was given (titles, hashes), the one loaded StableDiffusion
    jobs.py      the first-in first-out queue and its one worker thread; running a txt2img / img2img / explain job
    preview.py   the live preview: predicted x̂₀ at each step, decoded by the VAE or a cheap linear map
    app.py       the ASGI app (Starlette): routes, limits, basic auth, Host/Origin checks
    page.html    the page: one static file, no external request of any kind

Needs the optional extra: `pip install 'minidiff[serve]'` (starlette, uvicorn). `create_app` is imported from
minidiff.serve.app, so that importing this package needs neither.
"""
