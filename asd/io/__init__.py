"""Storage I/O: local or ``s3://`` URIs and atomic writes (:mod:`.storage`), the commit log and leases
on put-if-absent (:mod:`.commitlog`), every folder of a run root (:mod:`.layout`) and the serving
pointer ``models/CURRENT`` (:mod:`.serving`)."""
