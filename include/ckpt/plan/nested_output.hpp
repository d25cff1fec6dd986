// A torch output of a set that is no training checkpoint (a DCP directory, a
// safetensors set): its state dict as torch's own loader rebuilds it, what
// `dcp_to_torch_save` writes. Each item (tensor or object) goes where its
// key path puts it, as torch's set_element does: a str element is a dict key,
// an int element a list index (lists padded with None); dicts and lists are
// made as the paths first need them, in the set's order. The top level is a
// plain dict.
#pragma once

#include <string>
#include <vector>

#include "ckpt/io/mapped_file.hpp"
#include "ckpt/layout/tensor_source.hpp"
#include "ckpt/manifest/input_layouts.hpp"
#include "ckpt/plan/checkpoint_builder.hpp"
#include "ckpt/plan/plan.hpp"

namespace ckpt {

// The file at `path`: `items` nested, a tensor item being `tensors[item.tensor]`
// (a tie, alias_of an earlier tensor's name, that tensor's very object)
// and an object item the torch.save archive at its range of `files[item.file]`
// (decoded as data, its storages copied from their records). `sources[i]` is
// the plan source of manifest file i. Throws Error naming `items_from` (the
// file that nests them) and the keys whose paths
// cannot nest (a path through a value, a str key into a list, an int index
// into a dict, two items at one path, an item where others nest: torch's
// loader would keep one and lose the other), and naming the file, key and
// offset of an object item that does not read.
PlannedFile plan_nested_torch_file(const std::string& path, const std::vector<NamedTensor>& tensors,
                                   const std::vector<NestedItem>& items, const std::string& items_from,
                                   const std::vector<const MappedFile*>& files,
                                   const std::vector<std::uint32_t>& sources, Plan& plan);

// The same checks of the paths alone (a DCP output keeps them for a loader to
// nest): Error as above.
void check_nesting(const std::vector<NestedItem>& items, const std::string& items_from);

// The object item `item` (no tensor) added to `builder`: its torch.save
// archive in `files[item.file]` decoded as data, its storages copied from
// their records. Throws Error naming the file, the key and the offset of an
// item that does not read.
pickle::NodeId add_object_item(CheckpointBuilder& builder, const NestedItem& item,
                               const std::vector<const MappedFile*>& files);

}  // namespace ckpt
