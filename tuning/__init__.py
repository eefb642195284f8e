"""Ray Tune search spaces and the Tune driver (see issue "Ray Tune search")."""
