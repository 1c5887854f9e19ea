"""HTTP resources, one router module each (built per app from its settings).

* :mod:`service.routers.inspection` - ``POST /inspect``
* :mod:`service.routers.operations` - ``/health``, ``/ready``, ``/metrics``
"""
