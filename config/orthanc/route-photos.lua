-- Orthanc routing rule for dicom_node: forward every new body photograph, and every segmentation
-- drawn on one (a lesion mask for the %TBSA report), to the node.
--
-- Forwarded:
-- * VL Photographic Image Storage instances (the photos the node parses);
-- * Segmentation Storage instances whose Common Instance Reference (PS3.3 C.12.2, the SEG's
--   ReferencedSeriesSequence) names a VL Photographic Image: a viewer's segmentation of a photo.
--   The node decides which of them are lesion masks ([lesion] in node.toml) and acknowledges the
--   others without keeping them; SEGs of CT, MR and the like never leave Orthanc.
-- Never forwarded, whatever its SOP class: what arrives from the node's AE title, and what the node
-- made (Manufacturer 'dicom_node', in every result it writes), so the node's own body-part SEG, overlay and
-- SR are not sent back to it even when they come in by another route (STOW-RS). Each check alone
-- prevents a loop; together they survive a change to the other side's configuration.
--
-- Orthanc raises this event only for instances it did not hold before, so a photo sent twice is
-- forwarded once. If the node is unreachable, Orthanc's job fails and the instance stays in Orthanc:
-- resend it from Orthanc Explorer or with POST /modalities/node/store.

local VL_PHOTOGRAPHIC_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.77.1.4'
local SEGMENTATION_STORAGE = '1.2.840.10008.5.1.4.1.1.66.4'
local NODE_MODALITY = 'node'        -- the node's entry in DicomModalities
local NODE_AET = 'DICOM_NODE'       -- the node's AE title (ae_title in config/node.toml)
local NODE_MANUFACTURER = 'dicom_node'  -- what the node writes in Manufacturer

-- true when the SEG says it segments a VL Photographic Image (tags are Orthanc's simplified JSON:
-- a sequence is a Lua array of items)
local function segments_a_photo(tags)
  local series = tags['ReferencedSeriesSequence']
  if type(series) ~= 'table' then
    return false
  end
  for _, s in ipairs(series) do
    local instances = s['ReferencedInstanceSequence']
    if type(instances) == 'table' then
      for _, i in ipairs(instances) do
        if i['ReferencedSOPClassUID'] == VL_PHOTOGRAPHIC_IMAGE_STORAGE then
          return true
        end
      end
    end
  end
  return false
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == NODE_AET then
    return
  end
  if tags['Manufacturer'] == NODE_MANUFACTURER then
    return
  end
  local sop_class = tags['SOPClassUID']
  if sop_class == VL_PHOTOGRAPHIC_IMAGE_STORAGE
      or (sop_class == SEGMENTATION_STORAGE and segments_a_photo(tags)) then
    SendToModality(instanceId, NODE_MODALITY)
  end
end
