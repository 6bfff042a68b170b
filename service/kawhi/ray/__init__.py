"""kawhi on Ray Serve (install ``kawhi-rl[ray]``): a front end like ``kawhi serve``, nothing
else imports it.

* ``kawhi.ray.deployment``: the Serve deployment hosting the serving core, HTTP ingress
  through Ray's proxy, handle methods for Ray actors (``kawhi_app``);
* ``kawhi.ray.router``: the request router (rendezvous hashing on the routing key);
* ``kawhi.ray.handle``: what a ``DeploymentHandle`` call carries (plain Python, image bytes);
* ``kawhi.ray.cli``: ``kawhi ray serve``.

docs/operations.md "Ray Serve" says when to choose it over Kubernetes or one process.
"""
