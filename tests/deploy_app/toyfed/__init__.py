"""Stand-in Flower App for testing flexmoe's deployment machinery."""
