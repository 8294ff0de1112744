-- Orthanc routing rule for dicom_node: forward every new body photograph to the node.
--
-- Only VL Photographic Image Storage instances are forwarded, so the node's results (SEG, Secondary
-- Capture, SR) are never sent back to it; and nothing that arrives from the node's own AE title is
-- forwarded, whatever its SOP class. Either check alone prevents a loop; both together survive a
-- change to the other side's configuration.
--
-- Orthanc raises this event only for instances it did not hold before, so a photo sent twice is
-- forwarded once. If the node is unreachable, Orthanc's job fails and the photo stays in Orthanc:
-- resend it from Orthanc Explorer or with POST /modalities/node/store.

local VL_PHOTOGRAPHIC_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.77.1.4'
local NODE_MODALITY = 'node'        -- the node's entry in DicomModalities
local NODE_AET = 'DICOM_NODE'       -- the node's AE title (ae_title in config/node.toml)

function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['SOPClassUID'] ~= VL_PHOTOGRAPHIC_IMAGE_STORAGE then
    return
  end
  if origin ~= nil and origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == NODE_AET then
    return
  end
  SendToModality(instanceId, NODE_MODALITY)
end
