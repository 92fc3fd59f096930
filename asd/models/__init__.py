"""The encoders: the BEATs-compatible transformer (:mod:`.encoder`), the CNNs trained from scratch
(:mod:`.cnn`, :mod:`.modnet`), margin heads (:mod:`.heads`), the models attribute training builds
(:mod:`.attribute`), every architecture's checkpoint file (:mod:`.registry`) and the embedders
(:mod:`.embedders`)."""
