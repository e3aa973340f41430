from django.apps import AppConfig


class LabConfig(AppConfig):
    """Development tooling: chaos, benchmarks, data generators. Nothing production runs.

    Installed only in a checkout (see ``SAGARUNNER_LAB`` in the settings); it has no models and
    registers nothing when Django starts, so installing it changes no runtime behaviour.
    """

    name = "lab"
    verbose_name = "Lab (development tooling)"
