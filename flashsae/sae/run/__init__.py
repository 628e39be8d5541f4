"""Running ``flashsae train``: the options of a run and the command that starts one."""
