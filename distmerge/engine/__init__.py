"""The Ray side of a merge: worker actors and the driver that plans, reduces and finalizes."""
