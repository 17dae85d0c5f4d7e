"""A real fleet on Flower 1.42's deployment engine, as its operator runs it (docs/fleet.md):
certificates and SuperNode keys (``pki``), process supervision (``processes``), the SuperLink,
SuperNodes and runs (``deployment``), and the ``fedquant fleet`` commands over them (``commands``)."""
