"""Products: a quality engineer's registered parts, taught from good photos.

* :mod:`service.products.repository` - database operations (SQLAlchemy sessions)
* :mod:`service.products.onboarding` - rebuild a product's reference and calibrate it (worker
  and CLI): good photos from the database -> ``detector.build_reference`` -> stored atomically
* :mod:`service.products.resolver` - API side: product name -> what ``/inspect`` needs (cached)
* :mod:`service.products.references` - worker side: reference banks cached by version
* :mod:`service.products.models` - request and response bodies of the products API
"""
